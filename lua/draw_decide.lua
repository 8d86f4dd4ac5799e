--[[ draw_decide: decide the next batch of a SKU's fair-start draw, in rank order, and move the
  draw's cursor past it in the same atomic step: a batch is applied once, whichever drawer
  sends it, and a drawer that crashed is resumed from the cursor. Each pre-queued order is
  decided with intake's rules (sale end, stock, per-user limit): QUEUED -> HELD (its hold
  deadline starts now) or QUEUED -> REJECTED; its waiting units go, and it leaves the queue
  here (backlog, queue_out, as finalize.lua counts an order it decides; its stream entry is then
  only acknowledged), so the orders after the start move up as the draw goes. The last batch
  marks the draw done, after which finalizers decide the orders that came at or after the
  start. Time in epoch milliseconds.

  KEYS[1] fg:{S}:sku (hash)        draw draw_cursor draw_total available per_user_limit ends_at
                                   backlog queue_out drained_at drained_left (finalize.lua)
  KEYS[2] fg:{S}:users (hash)      user_id -> units held or bought
  KEYS[3] fg:{S}:holds (zset)      order_id -> hold deadline ms
  KEYS[4] fg:{S}:events (stream)   outbound events (REJECTED, with the order record)
  KEYS[5] fg:{S}:waiting (hash)    user_id -> units pre-queued, not yet drawn
  KEYS[6] fg:{S}:draw (list)       the drawn order ids in rank order
  ARGV[1] cursor: the draw's cursor this batch starts at (its first order's rank - 1)
  ARGV[2] hold_ttl_ms   ARGV[3] now_ms ("" = server TIME)
  ARGV[4] orders_prefix: the order-record key prefix of S ("fg:{S}:o:")
  ARGV[5..] order_ids: the batch, in rank order

  Returns {code, cursor, held, rejected}: held and rejected count the batch's orders this call
  decided HELD and REJECTED (0 unless DECIDED)
     1 DECIDED      cursor: the draw's cursor after the batch
     0 STALE        cursor: the stored cursor (another drawer moved it; nothing written)
    -1 NOT_DRAWING  cursor: 0 (the draw is not open, or done; nothing written)
]]
local rcall = redis.call
local cfg = rcall('HMGET', KEYS[1], 'draw', 'draw_cursor', 'draw_total', 'per_user_limit',
  'ends_at')
if cfg[1] ~= 'drawing' then
  return {-1, 0, 0, 0}
end
local cursor = tonumber(cfg[2])
if cursor ~= tonumber(ARGV[1]) then
  return {0, cursor, 0, 0}
end
local n = #ARGV - 4
if cursor + n > tonumber(cfg[3]) then
  return redis.error_reply('draw batch past the end of the draw')  -- before any write
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now_s = string.format('%d', now)
local ended = cfg[5] and now >= tonumber(cfg[5]) * 1000

local left_queue = 0  -- orders of the batch that left the queue
local held, rejected = 0, 0  -- orders of the batch decided HELD, REJECTED

local function decide(order_id, key, rank)
  local o = rcall('HMGET', key, 'status', 'user_id', 'quantity', 'history', 'paid_in_time',
    'drained')
  if o[1] ~= 'QUEUED' then
    return  -- no such record, or decided already: the rank is still recorded in the list
  end
  if not o[6] then  -- not counted out yet (a dead-lettered entry was)
    rcall('HSET', key, 'drained', '1')
    left_queue = left_queue + 1
  end
  local user, qty, history = o[2], tonumber(o[3]), o[4]
  local left = rcall('HINCRBY', KEYS[5], user, -qty)
  if left <= 0 then
    rcall('HDEL', KEYS[5], user)
  end
  local reason
  if ended then
    reason = 'sale_not_active'
  elseif tonumber(rcall('HGET', KEYS[1], 'available')) < qty then
    reason = 'sold_out'
  elseif tonumber(rcall('HGET', KEYS[2], user) or '0') + qty > tonumber(cfg[4]) then
    reason = 'limit_exceeded'
  end
  local to = reason and 'REJECTED' or 'HELD'
  history = string.sub(history, 1, -2) .. ',{"from":"QUEUED","to":"' .. to .. '","at":' ..
    now_s .. '}]'
  rcall('HSET', key, 'status', to, 'history', history, 'updated_at', now_s, 'draw_rank', rank)
  if reason then
    rcall('HSET', key, 'reason', reason)
    local rec = rcall('HMGET', key, 'sku_id', 'promotion_id', 'created_at', 'payment_id')
    local event = {KEYS[4], '*', 'event', 'REJECTED', 'order_id', order_id, 'status', to,
      'user_id', user, 'sku_id', rec[1], 'quantity', o[3], 'promotion_id', rec[2],
      'created_at', rec[3], 'at', now_s, 'history', history}
    if rec[4] then
      table.insert(event, 'payment_id'); table.insert(event, rec[4])
    end
    table.insert(event, 'reason'); table.insert(event, reason)
    rcall('XADD', unpack(event))
    rejected = rejected + 1
    return
  end
  held = held + 1
  local deadline = now + tonumber(ARGV[2])
  rcall('HINCRBY', KEYS[1], 'available', -qty)
  rcall('HINCRBY', KEYS[1], 'held', qty)
  rcall('HINCRBY', KEYS[2], user, qty)
  rcall('ZADD', KEYS[3], o[5] == '1' and '+inf' or deadline, order_id)
  rcall('HSET', key, 'hold_expires_at', string.format('%d', deadline))
end

for i = 5, #ARGV do
  local order_id = ARGV[i]
  local dot = string.find(order_id, '.', 1, true)
  if dot then
    decide(order_id, ARGV[4] .. string.sub(order_id, 1, dot - 1), cursor + i - 4)
  end
  rcall('RPUSH', KEYS[6], order_id)
end
if left_queue > 0 then
  -- the queue moved: the drain rate's busy time starts here, not at an earlier drain
  local left = rcall('HINCRBY', KEYS[1], 'backlog', -left_queue)
  rcall('HINCRBY', KEYS[1], 'queue_out', left_queue)
  rcall('HSET', KEYS[1], 'drained_at', now_s, 'drained_left', left)
end
cursor = cursor + n
rcall('HSET', KEYS[1], 'draw_cursor', cursor)
if cursor == tonumber(cfg[3]) then
  rcall('HSET', KEYS[1], 'draw', 'done', 'drawn_at', now_s)
end
return {1, cursor, held, rejected}
