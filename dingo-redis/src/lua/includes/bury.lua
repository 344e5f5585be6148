local function bury(list, size, entry, max, max_bytes)
  max, max_bytes = tonumber(max), tonumber(max_bytes)
  -- One that alone exceeds the byte bound is dropped, and the older letters stay.
  if max_bytes > 0 and #entry > max_bytes then return 1 end
  local n = redis.call('LPUSH', list, entry)
  local bytes = n > 1 and redis.call('GET', size)
  if bytes then
    bytes = tonumber(bytes) + #entry
  else
    bytes = 0
    for _, e in ipairs(redis.call('LRANGE', list, 0, -1)) do bytes = bytes + #e end
  end
  local dropped = 0
  while n > 0 and ((max > 0 and n > max) or (max_bytes > 0 and bytes > max_bytes)) do
    bytes = bytes - #redis.call('RPOP', list)
    n = n - 1
    dropped = dropped + 1
  end
  if n > 0 then redis.call('SET', size, bytes) else redis.call('DEL', size) end
  return dropped
end
