local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local mark = ARGV[2]
local body = string.sub(mark, 1, #mark - 1)
local max = tonumber(ARGV[3])
local requeued, dead, heads, dropped = 0, 0, {}, 0
for _, consumer in ipairs(expired) do
  local list = ARGV[6] .. consumer
  while true do
    local m = redis.call('LPOP', list)
    if not m then break end
    local count, stop = 0, #m - 1
    while stop >= #body and string.sub(m, stop - #body + 1, stop) == body do
      count = count + 1
      stop = stop - #body
    end
    if count >= max then
      dropped = dropped + bury(KEYS[4], KEYS[5], ARGV[5] .. m, ARGV[4], ARGV[8])
      dead = dead + 1
      heads[dead] = string.sub(m, 1, tonumber(ARGV[7]))
    else
      redis.call('RPUSH', KEYS[2], string.sub(m, 1, -2) .. mark)
      requeued = requeued + 1
    end
  end
  redis.call('DEL', list)
  redis.call('ZREM', KEYS[1], consumer)
end
if requeued > 0 and redis.call('LLEN', KEYS[3]) == 0 then redis.call('LPUSH', KEYS[3], '1') end
return {requeued, dead, heads, dropped}
