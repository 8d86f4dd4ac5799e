--[[ release_guard: delete a guard key only while it still holds this request's value (a
  compare-and-delete): a payment_id claimed for an order that turned out to be unknown.

  KEYS[1] fg:{p:<payment_id>} (string) the guard (claim_guard.lua)
  ARGV[1] value: the value this request wrote

  Returns code: 1 RELEASED, 0 KEPT (the guard holds something else, or nothing)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
