local dropped = 0
local i = 3
while i <= #ARGV do
  dropped = dropped + bury(KEYS[1], KEYS[2], ARGV[i] .. ARGV[i + 1], ARGV[1], ARGV[2])
  i = i + 2
end
return dropped
