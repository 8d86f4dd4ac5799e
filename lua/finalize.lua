--[[ finalize: apply one order-stream entry and acknowledge it in the same atomic step, so an
  entry is never acknowledged without its effect and never applied twice (a redelivered entry
  finds its effect already there). Every check runs before the first write.

  KEYS[1] fg:{S}:sku (hash)        counters and sale config (see create_order.lua)
  KEYS[2] fg:{S}:users (hash)      user_id -> units held or bought
  KEYS[3] fg:{S}:holds (zset)      order_id -> hold deadline ms
  KEYS[4] fg:{S}:stream (stream)   the order stream (XACK)
  KEYS[5] fg:{S}:o:<rand> (hash)   the order record
  KEYS[6] fg:{S}:events (stream)   outbound events: every final state, with the order record
  KEYS[7] fg:{S}:pay:<payment_id> (hash, optional) order_id at applied ("paid" entries only)

  ARGV[1] group (the consumer group)   ARGV[2] entry_id   ARGV[3] event: "created" | "paid"
  ARGV[4] order_id         ARGV[5] payment_id ("" for "created")
  ARGV[6] hold_ttl_ms      ARGV[7] now_ms ("" = server TIME)

  "created": a QUEUED order is decided with intake's rules (sale window, stock, per-user limit):
    QUEUED -> HELD (its hold deadline starts now) or QUEUED -> REJECTED; the SKU's backlog
    shrinks by one, once per order, and the queue's counters move: queue_out (orders drained,
    ever) and the drain rate (orders per second of busy time, an EWMA over windows of 1 s or
    500 orders, whichever comes first; busy: between two drains when the first left orders
    waiting).
  "paid" (confirm_payment.lua recorded the payment on the order and judged it in time or late):
    HELD and paid in time -> CONFIRMED (held units become sold); HELD and paid late ->
    PAID_AFTER_EXPIRY (the hold is released first); EXPIRED -> PAID_AFTER_EXPIRY; a payment of
    a REJECTED or settled order, or a second payment, changes no state and emits
    "refund_needed". A QUEUED order is decided first.

  A QUEUED order of a SKU whose fair-start draw is not done (draw "pending" or "drawing") is
  not decided: nothing is written and the entry stays pending (WAITING) until the draw is done.
  A pre-queued order the draw decided has left the queue there (draw_decide.lua): its entry is
  only acknowledged.

  Returns {code, status, waited_ms, eta_ms}: 1 APPLIED, 0 DUPLICATE (effect already stored),
    -1 UNKNOWN_ORDER, 2 WAITING (the SKU's draw comes first); status: the order's status after
    the entry ("" for an unknown order); waited_ms: how long a QUEUED order this entry decided
    was queued, eta_ms: the ETA it was told when queued ("" when none)
]]
local rcall = redis.call
local now
if ARGV[7] ~= '' then
  now = tonumber(ARGV[7])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now_s = string.format('%d', now)

local o = rcall('HMGET', KEYS[5], 'status', 'user_id', 'quantity', 'drained', 'history',
  'hold_expires_at', 'paid_in_time', 'payment_id', 'created_at', 'queue_eta_ms')
if not o[1] then
  rcall('XACK', KEYS[4], ARGV[1], ARGV[2])
  return {-1, '', '', ''}
end
local waited = ''
local status, user, qty = o[1], o[2], tonumber(o[3])
local history = o[5]
if not user or not qty or not history or string.sub(history, -1) ~= ']' then
  return redis.error_reply('corrupt order record ' .. ARGV[4])  -- before any write
end

if status == 'QUEUED' then
  local draw = rcall('HGET', KEYS[1], 'draw')
  if draw == 'pending' or draw == 'drawing' then
    return {2, status, '', ''}
  end
end

local function move(to, extra)
  history = string.sub(history, 1, -2) .. ',{"from":"' .. status .. '","to":"' .. to ..
    '","at":' .. now_s .. '}]'
  rcall('HSET', KEYS[5], 'status', to, 'history', history, 'updated_at', now_s)
  status = to
  if extra then
    rcall('HSET', KEYS[5], unpack(extra))
  end
end

local function emit(event, fields)
  local rec = rcall('HMGET', KEYS[5], 'user_id', 'sku_id', 'quantity', 'promotion_id',
    'created_at', 'payment_id')
  local args = {KEYS[6], '*', 'event', event, 'order_id', ARGV[4], 'status', status,
    'user_id', rec[1], 'sku_id', rec[2], 'quantity', rec[3], 'promotion_id', rec[4],
    'created_at', rec[5], 'at', now_s, 'history', history}
  if rec[6] then
    table.insert(args, 'payment_id'); table.insert(args, rec[6])
  end
  for _, v in ipairs(fields or {}) do
    table.insert(args, v)
  end
  rcall('XADD', unpack(args))
end

local function release()  -- give a HELD order's units back to stock
  rcall('HINCRBY', KEYS[1], 'available', qty)
  rcall('HINCRBY', KEYS[1], 'held', -qty)
  local left = rcall('HINCRBY', KEYS[2], user, -qty)
  if left <= 0 then
    rcall('HDEL', KEYS[2], user)
  end
  rcall('ZREM', KEYS[3], ARGV[4])
end

local ALPHA = 0.3  -- the weight of the newest window in the drain rate
local function drained()  -- one order left the queue: its counters and the drain rate
  local left = rcall('HINCRBY', KEYS[1], 'backlog', -1)
  rcall('HINCRBY', KEYS[1], 'queue_out', 1)
  local r = rcall('HMGET', KEYS[1], 'drained_at', 'drained_left', 'busy_ms', 'busy_n',
    'drain_rate')
  local busy_ms, busy_n = tonumber(r[3] or '0'), tonumber(r[4] or '0')
  if r[1] and tonumber(r[2]) > 0 then  -- orders waited since the last drain: busy time
    busy_ms, busy_n = busy_ms + math.max(0, now - tonumber(r[1])), busy_n + 1
  end
  if busy_ms >= 1000 or (busy_n >= 500 and busy_ms > 0) then  -- a window closes
    local rate = busy_n * 1000 / busy_ms
    if r[5] then
      rate = ALPHA * rate + (1 - ALPHA) * tonumber(r[5])
    end
    rcall('HSET', KEYS[1], 'drain_rate', string.format('%.3f', rate))
    busy_ms, busy_n = 0, 0
  end
  rcall('HSET', KEYS[1], 'drained_at', now_s, 'drained_left', left, 'busy_ms', busy_ms,
    'busy_n', busy_n)
end

local function decide()  -- QUEUED -> HELD | REJECTED, intake's rules
  waited = string.format('%d', now - tonumber(o[9] or now))
  local cfg = rcall('HMGET', KEYS[1], 'available', 'per_user_limit', 'starts_at', 'ends_at')
  local reason
  if not cfg[1] then
    reason = 'unknown_sku'
  elseif cfg[3] and now < tonumber(cfg[3]) * 1000 then
    reason = 'sale_not_active'
  elseif cfg[4] and now >= tonumber(cfg[4]) * 1000 then
    reason = 'sale_not_active'
  elseif tonumber(cfg[1]) < qty then
    reason = 'sold_out'
  elseif tonumber(rcall('HGET', KEYS[2], user) or '0') + qty > tonumber(cfg[2]) then
    reason = 'limit_exceeded'
  end
  if reason then
    move('REJECTED', {'reason', reason})
    emit('REJECTED', {'reason', reason})
    return
  end
  local deadline = now + tonumber(ARGV[6])
  rcall('HINCRBY', KEYS[1], 'available', -qty)
  rcall('HINCRBY', KEYS[1], 'held', qty)
  rcall('HINCRBY', KEYS[2], user, qty)
  -- a payment that came while the order was queued is in time: no deadline to sweep
  rcall('ZADD', KEYS[3], o[7] == '1' and '+inf' or deadline, ARGV[4])
  move('HELD', {'hold_expires_at', string.format('%d', deadline)})
end

local applied = 0
if ARGV[3] == 'created' then
  if status == 'QUEUED' then  -- also when a dead-lettered entry is put back after a repair
    decide()
    applied = 1
  end
  if not o[4] then
    rcall('HSET', KEYS[5], 'drained', '1')
    drained()
    applied = 1
  end
elseif ARGV[3] == 'paid' then
  local pay = rcall('HMGET', KEYS[7], 'order_id', 'applied')
  if pay[1] == ARGV[4] and not pay[2] then
    if status == 'QUEUED' then
      decide()
    end
    local mine = o[8] == ARGV[5]
    if status == 'HELD' and mine and o[7] == '1' then
      rcall('HINCRBY', KEYS[1], 'held', -qty)
      rcall('HINCRBY', KEYS[1], 'sold', qty)
      rcall('ZREM', KEYS[3], ARGV[4])
      move('CONFIRMED')
      emit('CONFIRMED')
    elseif (status == 'HELD' and mine) or (status == 'EXPIRED' and (mine or not o[8])) then
      if status == 'HELD' then  -- paid after the deadline, before the sweeper came
        release()
      end
      rcall('HSET', KEYS[5], 'payment_id', ARGV[5])
      move('PAID_AFTER_EXPIRY')
      emit('PAID_AFTER_EXPIRY', {'refund_needed', '1'})
    else  -- REJECTED, settled, or a second payment of one order
      emit('refund_needed', {'refund_needed', '1', 'refund_payment_id', ARGV[5]})
    end
    rcall('HSET', KEYS[7], 'applied', now_s)
    applied = 1
  end
else
  return redis.error_reply('unknown stream event ' .. tostring(ARGV[3]))
end
rcall('XACK', KEYS[4], ARGV[1], ARGV[2])
return {applied, status, waited, waited ~= '' and o[10] or ''}
