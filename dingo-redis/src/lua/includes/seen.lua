local function seen(key, n, ttl)
  local prior = redis.call('SET', key, n, 'PX', ttl, 'GET')
  if prior and math.floor(tonumber(prior)) >= tonumber(n) then
    redis.call('SET', key, prior, 'PX', ttl)
    return true, tonumber(string.match(prior, '%.(%d+)$')) or 0
  end
  return false, 0
end
