local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[4], 'NX', now + lease, ARGV[3])
else
  local deadline = redis.call('ZSCORE', KEYS[4], ARGV[3])
  if not deadline then return {'lost'} end
  -- Renewed once half of it is gone (the keeper renews every third of it): a fetch after
  -- a stall takes tasks under a lease that still stands.
  if tonumber(deadline) - now < lease / 2 then redis.call('ZADD', KEYS[4], 'XX', now + lease, ARGV[3]) end
end
local function head(n)
  local msgs = {}
  if n > 0 then
    local newest_first = redis.call('LRANGE', KEYS[5], 0, n - 1)
    for i = #newest_first, 1, -1 do msgs[#msgs + 1] = newest_first[i] end
  end
  return msgs
end
-- Applied already (sent again after its reply was lost): `N.C`, recorded below (as `SEEN`
-- does, with one write instead of two).
local prior = redis.call('GET', KEYS[6])
if prior and math.floor(tonumber(prior)) >= tonumber(ARGV[5]) then
  redis.call('PEXPIRE', KEYS[6], ARGV[6])
  return {'again', head(tonumber(string.match(prior, '%.(%d+)$')) or 0), redis.call('GET', KEYS[7]) or '0'}
end
local queued = redis.call('LLEN', KEYS[1])
local n = math.min(tonumber(ARGV[1]), queued)
if n == 1 then
  redis.call('LMOVE', KEYS[1], KEYS[5], 'RIGHT', 'LEFT')
elseif n > 1 then
  -- The oldest n (the tail), in their order: the newest of them ends at the head. SORT is
  -- in ACL's @dangerous category: where it is not allowed, the messages go through Lua.
  local copied = redis.call('LLEN', KEYS[5]) == 0
    and type(redis.pcall('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', queued - n, n, 'STORE', KEYS[5])) == 'number'
  if copied then
    if n == queued then redis.call('DEL', KEYS[1]) else redis.call('LTRIM', KEYS[1], 0, queued - n - 1) end
  else
    redis.call('LPUSH', KEYS[5], unpack(redis.call('RPOP', KEYS[1], n)))
  end
end
queued = queued - n
redis.call('SET', KEYS[6], ARGV[5] .. '.' .. n, 'PX', ARGV[6])
if queued > 0 or redis.call('LLEN', KEYS[2]) > 0 then
  if redis.call('LLEN', KEYS[3]) == 0 then redis.call('LPUSH', KEYS[3], '1') end
else
  redis.call('DEL', KEYS[3])
end
-- The queue's cancel generation: the worker loads the cancels it does not know yet before
-- it hands out what it took.
local gen = redis.call('GET', KEYS[7]) or '0'
if ARGV[7] == '1' then return {'ok', head(n), gen} end
return {'ok', n, gen}
