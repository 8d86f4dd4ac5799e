--[[ claim_guard: claim a guard key for a value unless it holds one already (SET NX that
  answers what it found), e.g. a payment_id for the order it confirms. Sent again after a
  lost answer, it finds its own value.

  KEYS[1] the guard (string)   ARGV[1] this request's value

  Returns "" when claimed now, else the value the guard already holds.
]]
local held = redis.call('GET', KEYS[1])
if held then
  return held
end
redis.call('SET', KEYS[1], ARGV[1])
return ''
