-- A server without it (a Redis-compatible one) cannot be asked: nothing is checked.
if not redis.acl_check_cmd then return {} end
local denied = {}
local i, k = 1, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  k = k + 1
  if not redis.acl_check_cmd(ARGV[i], unpack(ARGV, i + 2, i + 1 + n)) then denied[#denied + 1] = k end
  i = i + 2 + n
end
return denied
