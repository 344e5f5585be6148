if seen(KEYS[3], ARGV[1], ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[1], unpack(ARGV, 3))
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('LPUSH', KEYS[2], '1') end
return #ARGV - 2
