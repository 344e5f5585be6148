if seen(KEYS[3], ARGV[1], ARGV[5]) then return {1, 0, 0} end
local owned = redis.call('ZSCORE', KEYS[1], ARGV[3]) ~= false
local rejected, dropped = 0, 0
local touched = {}
local function report(k, data)
  if data == '' then return end
  redis.call('RPUSH', KEYS[8 + 2 * k], data)
  touched[k] = true
end
-- Consecutive completions remove their messages with one LTRIM (an RPOP would copy each
-- message into Lua only to drop it).
local settled = 0
local function flush()
  if settled > 0 then redis.call('LTRIM', KEYS[2], 0, -settled - 1); settled = 0 end
end
-- Retries: the next attempt goes to the delayed set (`KEYS[8]`), or, due already, to the
-- queue; a promoter is woken (`KEYS[9]`) when one falls due before all the others.
local now, earliest, poke, woke
local function retry(first, last)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local head = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    earliest = head[2] and tonumber(head[2])
  end
  for j = first, last, 2 do
    local score = tonumber(ARGV[j])
    if score < now then
      redis.call('LPUSH', KEYS[5], ARGV[j + 1])
      woke = true
    else
      redis.call('ZADD', KEYS[8], score, ARGV[j + 1])
      if not earliest or score < earliest then earliest, poke = score, true end
    end
  end
end
local i = 7
while i <= #ARGV do
  local op, k, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local first = i + 3
  local last = first - 1
  if op == 'd' or op == 'x' then last = first + n - 1
  elseif op == 'z' then last = first + 2 * n - 1
  elseif op == 'r' or (op == 'c' and k > 0) then last = first end
  i = last + 1
  if op ~= 'c' and op ~= 'z' then flush() end
  if op == 'r' then
    report(k, ARGV[first])
  elseif not owned then
    if op == 'c' or op == 'z' then rejected = rejected + n end
  elseif op == 'c' then
    settled = settled + n
    if k > 0 then report(k, ARGV[first]) end
  elseif op == 'z' then
    -- The oldest n messages are settled, their next attempts queued in the same step.
    settled = settled + n
    retry(first, last)
  elseif op == 'd' or op == 'x' then
    -- 'd' the oldest message, 'x' the newest.
    local pop = op == 'd' and 'RPOP' or 'LPOP'
    for j = first, last do
      local m = redis.call(pop, KEYS[2])
      if m then
        if k > 0 then m = string.sub(m, 1, k) end
        dropped = dropped + bury(KEYS[4], KEYS[7], ARGV[j] .. m, ARGV[4], ARGV[6])
      end
    end
  elseif op == 'q' then
    for _ = 1, n do
      local m = redis.call('LPOP', KEYS[2])
      if m then
        redis.call('RPUSH', KEYS[5], m)
        if redis.call('LLEN', KEYS[6]) == 0 then redis.call('LPUSH', KEYS[6], '1') end
      end
    end
  end
end
flush()
if woke and redis.call('LLEN', KEYS[6]) == 0 then redis.call('LPUSH', KEYS[6], '1') end
if poke and redis.call('LLEN', KEYS[9]) == 0 then redis.call('LPUSH', KEYS[9], '1') end
for k in pairs(touched) do
  local reply, notify = KEYS[8 + 2 * k], KEYS[9 + 2 * k]
  redis.call('PEXPIRE', reply, ARGV[2])
  if redis.call('LLEN', notify) == 0 then redis.call('LPUSH', notify, '1') end
  redis.call('PEXPIRE', notify, ARGV[2])
end
return {owned and 1 or 0, rejected, dropped}
