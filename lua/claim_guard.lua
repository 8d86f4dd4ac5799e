--[[ claim_guard: claim a guard key for a value unless it holds one already (SET NX that
  answers what it found): a payment_id for the order it confirms. Sent again after a lost
  answer, it finds its own value.

  KEYS[1] fg:{p:<payment_id>} (string) the guard: the order the payment_id confirms
  ARGV[1] value: this request's value

  Returns held: "" when claimed now, else the value the guard already holds
]]
local held = redis.call('GET', KEYS[1])
if held then
  return held
end
redis.call('SET', KEYS[1], ARGV[1])
return ''
