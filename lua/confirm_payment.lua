--[[ confirm_payment: record a payment provider's confirmation durably (idempotent on the
  payment_id) and queue it for the finalizers. This is where payment and expiry meet: a payment
  recorded before the hold deadline wins (its hold leaves the sweeper's reach), one recorded at
  or after the deadline loses to the expiry. Every check runs before the first write.

  KEYS[1] fg:{S}:pay:<payment_id> (hash) order_id at
  KEYS[2] fg:{S}:o:<rand> (hash)   the order record
  KEYS[3] fg:{S}:holds (zset)      order_id -> hold deadline ms
  KEYS[4] fg:{S}:stream (stream)   the order stream
  KEYS[5] fg:{p:<payment_id>} (string, optional) order_id: the payment_id across SKUs
  ARGV[1] payment_id   ARGV[2] order_id   ARGV[3] now_ms ("" = server TIME)
  ARGV[4] durable: "1": the gateway waits for durability (WAITAOF): a replay counts itself on
          the payment record (a write), so the wait covers the payment it answers for

  Returns {code}: 1 ACCEPTED, 2 REPLAYED (same payment, same order), -1 UNKNOWN_ORDER,
                  -2 PAYMENT_REUSED (this payment_id confirmed another order)
]]
local rcall = redis.call
local seen = rcall('HGET', KEYS[1], 'order_id')
if seen then
  if seen == ARGV[2] then
    if ARGV[4] == '1' then
      rcall('HINCRBY', KEYS[1], 'replays', 1)
    end
    return {2}
  end
  return {-2}
end
if KEYS[5] then
  local first = rcall('GET', KEYS[5])
  if first and first ~= ARGV[2] then
    return {-2}
  end
end
local o = rcall('HMGET', KEYS[2], 'status', 'hold_expires_at', 'payment_id')
if not o[1] then
  return {-1}
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now_s = string.format('%d', now)

local record = not o[3] and (o[1] == 'QUEUED' or o[1] == 'HELD')
local in_time = o[1] == 'QUEUED' or (o[1] == 'HELD' and now < tonumber(o[2]))

rcall('HSET', KEYS[1], 'order_id', ARGV[2], 'at', now_s)
if KEYS[5] then
  rcall('SET', KEYS[5], ARGV[2])
end
if record then
  rcall('HSET', KEYS[2], 'payment_id', ARGV[1], 'paid_at', now_s,
    'paid_in_time', in_time and '1' or '0')
  if in_time and o[1] == 'HELD' then
    rcall('ZADD', KEYS[3], '+inf', ARGV[2])  -- the sweeper no longer sees this hold
  end
end
rcall('XADD', KEYS[4], '*', 'order_id', ARGV[2], 'event', 'paid', 'payment_id', ARGV[1])
return {1}
