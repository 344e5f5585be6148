local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Lapsed cancels go first (a thousand at a time: every cancel prunes), from the set and
-- from the log.
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
if #lapsed > 0 then
  redis.call('ZREM', KEYS[1], unpack(lapsed))
  redis.call('ZREM', KEYS[3], unpack(lapsed))
end
local untill = tonumber(ARGV[1])
if untill <= now then return 0 end
-- A new generation: above the last one, and above any this queue had before its keys
-- expired (the server's time in microseconds), so a process never mistakes it for one it
-- loaded.
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local gen = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, us)
for i = 2, #ARGV do
  local known = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not known or tonumber(known) < untill then redis.call('ZADD', KEYS[1], untill, ARGV[i]) end
  -- The log says which generation last touched the id: loaders read only what is newer.
  redis.call('ZADD', KEYS[3], gen, ARGV[i])
end
redis.call('SET', KEYS[2], string.format('%.0f', gen), 'KEEPTTL')
-- The keys expire with the cancel that lapses last.
if #redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, 1) == 0 then
  redis.call('PEXPIRE', KEYS[1], untill - now)
  redis.call('PEXPIRE', KEYS[2], untill - now)
  redis.call('PEXPIRE', KEYS[3], untill - now)
end
return #ARGV - 1
