local applied, count = seen(KEYS[6], ARGV[1], ARGV[2])
if applied then return count end
local replay = ARGV[3] == 'replay'
local step = replay and 2 or 1
local done, bytes = 0, 0
local queue, amo = {}, {}
-- From the tail: the oldest letters are there, and they go first.
for i = 4, #ARGV, step do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    done = done + 1
    bytes = bytes + #ARGV[i]
    if replay then
      -- Where a send would put it (see `promote.lua`): flag 4 of the options is at most once.
      local m = ARGV[i + 1]
      local tag, len, flags, last = string.byte(m, -4, -1)
      if last == 0 and len == 1 and tag == 4 and bit.band(flags, 4) ~= 0 then
        amo[#amo + 1] = m
      else
        queue[#queue + 1] = m
      end
    end
  end
end
if #queue > 0 then redis.call('LPUSH', KEYS[3], unpack(queue)) end
if #amo > 0 then redis.call('LPUSH', KEYS[4], unpack(amo)) end
if #queue + #amo > 0 and redis.call('LLEN', KEYS[5]) == 0 then redis.call('LPUSH', KEYS[5], '1') end
if done > 0 then
  local size = redis.call('GET', KEYS[2])
  if redis.call('LLEN', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[2])
  elseif size then
    redis.call('SET', KEYS[2], math.max(tonumber(size) - bytes, 0))
  end
end
redis.call('SET', KEYS[6], ARGV[1] .. '.' .. done, 'PX', ARGV[2])
return done
