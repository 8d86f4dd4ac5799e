--[[ claim_key: phase one of intake where a user's idempotency key and the SKU live in
  different slots (cluster mode). Claims (user, key) for one request before its SKU's script
  runs, so one key never makes orders on two SKUs. The SKU's own record
  (fg:{S}:idem:<user>:<key>, written atomically with the order) stays the answer to replays.

  KEYS[1] fg:{u:<user>}:ik:<key> (string) "P\n<token>\n<claimed_at_ms>\n<fingerprint>" while a
          request is in progress, "D\n<fingerprint>" once it was accepted (settle_key.lua)
  ARGV[1] token (this request's claim)  ARGV[2] fingerprint (sku|quantity|promotion)
  ARGV[3] stale_ms: a claim older than this may be abandoned (its gateway died between phases)
  ARGV[4] ttl_ms: the idempotency window   ARGV[5] now_ms ("" = server TIME)

  Returns {code, token, fingerprint}:
     1 CLAIMED       the key is this request's: run the SKU's script, then settle
     2 DONE_SAME     accepted earlier with this fingerprint: the SKU's script replays it
     3 PENDING_SAME  a request with this fingerprint is in progress: only a replay may answer
     4 STALE         an abandoned claim (its token and fingerprint): fence its token on its
                     SKU, settle it, claim again
    -5 KEY_REUSED    accepted earlier with another fingerprint
    -8 IN_USE        another request with this key is in progress
]]
local rcall = redis.call
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local stored = rcall('GET', KEYS[1])
if not stored then
  rcall('SET', KEYS[1], 'P\n' .. ARGV[1] .. '\n' .. string.format('%d', now) .. '\n' .. ARGV[2],
    'PX', ARGV[4])
  return {1, '', ''}
end
if string.sub(stored, 1, 2) == 'D\n' then
  if string.sub(stored, 3) == ARGV[2] then
    return {2, '', ''}
  end
  return {-5, '', ''}
end
local token, at, fingerprint = string.match(stored, '^P\n([^\n]*)\n([^\n]*)\n(.*)$')
if not token then
  return redis.error_reply('corrupt idempotency claim ' .. KEYS[1])
end
if token == ARGV[1] then
  return {1, '', ''}  -- this request's own claim, sent again after a lost answer
end
if now - tonumber(at) >= tonumber(ARGV[3]) then
  return {4, token, fingerprint}
end
if fingerprint == ARGV[2] then
  return {3, '', ''}
end
return {-8, '', ''}
