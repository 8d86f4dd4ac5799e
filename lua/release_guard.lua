--[[ release_guard: delete a guard key only while it still holds this request's value (a
  compare-and-delete), e.g. a payment_id claimed for an order that turned out to be unknown.

  KEYS[1] the guard (string)   ARGV[1] the value this request wrote

  Returns 1 when deleted, 0 when the guard holds something else (or nothing).
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
