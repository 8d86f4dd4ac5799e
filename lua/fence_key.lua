--[[ fence_key: the recovery of an abandoned cross-slot claim, on its SKU's slot. Either the
  abandoned request's order exists (its record answers), or the claim's token is fenced off:
  create_order.lua refuses a request carrying a fenced token, so a late delivery of the
  abandoned request can never make a second order once the key was given to another request.

  KEYS[1] fg:{S}:idem:<user>:<key> (string) the SKU's record (create_order.lua), or
          "!\n<token>\n<token>..." fenced tokens of abandoned claims
  ARGV[1] token: the abandoned claim's   ARGV[2] ttl_ms   ARGV[3] tokens_kept: most kept

  Returns code: 1 ORDER_EXISTS, 0 FENCED
]]
local rcall = redis.call
local stored = rcall('GET', KEYS[1])
if stored and string.sub(stored, 1, 2) ~= '!\n' then
  return 1
end
local fenced = stored or '!'
if not string.find(fenced .. '\n', '\n' .. ARGV[1] .. '\n', 1, true) then
  fenced = fenced .. '\n' .. ARGV[1]
  local _, count = string.gsub(fenced, '\n', '')
  if count > tonumber(ARGV[3]) then
    fenced = '!' .. string.sub(fenced, string.find(fenced, '\n', 3, true))
  end
end
rcall('SET', KEYS[1], fenced, 'PX', ARGV[2])
return 0
