for i = 1, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('LPUSH', KEYS[2], '1') end
return 0
