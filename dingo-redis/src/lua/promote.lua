local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The oldest due first, at most ARGV[1]: ranks 0 … n-1 of the set. Due: its millisecond is
-- over (a due time is rounded down to the millisecond: never early).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
local n = #due
if n > 0 then
  -- Where a send would have put each: a message ends with its options field, `4, 1,
  -- flags, 0`, and flag 4 is at most once. Anything else (not a message of ours) goes to
  -- the queue, whose fetch dead-letters what does not decode.
  local queue, amo = {}, {}
  for i = 1, n do
    local m = due[i]
    local tag, len, flags, last = string.byte(m, -4, -1)
    if last == 0 and len == 1 and tag == 4 and bit.band(flags, 4) ~= 0 then
      amo[#amo + 1] = m
    else
      queue[#queue + 1] = m
    end
  end
  if #queue > 0 then redis.call('LPUSH', KEYS[2], unpack(queue)) end
  if #amo > 0 then redis.call('LPUSH', KEYS[3], unpack(amo)) end
  redis.call('ZREM', KEYS[1], unpack(due))
  if redis.call('LLEN', KEYS[4]) == 0 then redis.call('LPUSH', KEYS[4], '1') end
end
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {n, first[2] and tonumber(first[2]) or -1, now}
