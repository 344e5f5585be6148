local gen = redis.call('GET', KEYS[2]) or '0'
if gen == ARGV[1] then return {gen} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Only the ids cancelled (or extended) after the generation the caller has: a cancel costs
-- each process what is new, not the whole set.
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')
local live = {}
for _, id in ipairs(ids) do
  local untill = redis.call('ZSCORE', KEYS[1], id)
  if untill and tonumber(untill) > now then
    live[#live + 1] = id
    live[#live + 1] = untill
  end
end
return {gen, live}
