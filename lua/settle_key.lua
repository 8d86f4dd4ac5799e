--[[ settle_key: phase three of a cross-slot intake (see claim_key.lua), and the recovery of an
  abandoned claim: the claim made with this token becomes "accepted" (kept for the idempotency
  window) or is released (a refused request leaves no trace). A claim that is no longer this
  token's (settled or recovered by another request) is left alone.

  KEYS[1] fg:{u:<user>}:ik:<key> (string) see claim_key.lua
  ARGV[1] token  ARGV[2] outcome: "done" | "release"  ARGV[3] fingerprint  ARGV[4] ttl_ms

  Returns code: 1 SETTLED, 0 NOT_MINE (the claim was not this token's)
]]
local rcall = redis.call
local stored = rcall('GET', KEYS[1])
if not stored or string.match(stored, '^P\n([^\n]*)\n') ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'done' then
  rcall('SET', KEYS[1], 'D\n' .. ARGV[3], 'PX', ARGV[4])
else
  rcall('DEL', KEYS[1])
end
return 1
