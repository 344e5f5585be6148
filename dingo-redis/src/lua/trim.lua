if seen(KEYS[2], ARGV[2], ARGV[3]) then return 0 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
return 1
