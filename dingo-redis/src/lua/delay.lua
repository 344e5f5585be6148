if seen(KEYS[3], ARGV[1], ARGV[2]) then return 0 end
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
redis.call('ZADD', KEYS[1], unpack(ARGV, 3))
local lowest
for i = 3, #ARGV, 2 do
  local score = tonumber(ARGV[i])
  if not lowest or score < lowest then lowest = score end
end
-- Due before everything the promoters wait for: wake one.
if lowest and (not first[2] or lowest < tonumber(first[2])) and redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('LPUSH', KEYS[2], '1')
end
return (#ARGV - 2) / 2
