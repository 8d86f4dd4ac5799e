--[[ sweep: release up to batch holds of one SKU whose deadline has passed, atomically:
  stock and the user's count come back, HELD -> EXPIRED, an "EXPIRED" outbound event. Holds paid
  in time carry the deadline +inf and are never selected; each order is re-checked, so two
  sweepers never release one hold twice.

  KEYS[1] fg:{S}:sku (hash)   KEYS[2] fg:{S}:users (hash)   KEYS[3] fg:{S}:holds (zset)
  KEYS[4] fg:{S}:events (stream)
  ARGV[1] now_ms ("" = server TIME)   ARGV[2] batch (most holds looked at)
  ARGV[3] orders_prefix: the order-record key prefix "fg:{S}:o:"
  ARGV[4] skip: how many due holds to skip (kept in the index by an earlier call of this sweep)

  Returns {released, units, selected, removed}: orders expired, their units, due holds looked
    at (== batch: call again, skipping the ones kept), holds removed from the index
]]
local rcall = redis.call
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now_s = string.format('%d', now)
local due = rcall('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', tonumber(ARGV[4] or '0'),
  tonumber(ARGV[2]))
local released, units, removed = 0, 0, 0
for _, oid in ipairs(due) do
  local dot = string.find(oid, '.', 1, true) or (#oid + 1)
  local key = ARGV[3] .. string.sub(oid, 1, dot - 1)
  local o = rcall('HMGET', key, 'status', 'user_id', 'quantity', 'history', 'sku_id',
    'promotion_id', 'created_at', 'paid_in_time', 'payment_id')
  local qty = tonumber(o[3])
  local sound = qty and o[2] and o[4] and o[5] and o[6] and o[7] and string.sub(o[4], -1) == ']'
  if o[1] == 'HELD' and o[8] ~= '1' and sound then
    rcall('HINCRBY', KEYS[1], 'available', qty)
    rcall('HINCRBY', KEYS[1], 'held', -qty)
    if rcall('HINCRBY', KEYS[2], o[2], -qty) <= 0 then
      rcall('HDEL', KEYS[2], o[2])
    end
    local history = string.sub(o[4], 1, -2) .. ',{"from":"HELD","to":"EXPIRED","at":' ..
      now_s .. '}]'
    rcall('HSET', key, 'status', 'EXPIRED', 'history', history, 'updated_at', now_s)
    local ev = {KEYS[4], '*', 'event', 'EXPIRED', 'order_id', oid, 'status', 'EXPIRED',
      'user_id', o[2], 'sku_id', o[5], 'quantity', o[3], 'promotion_id', o[6],
      'created_at', o[7], 'at', now_s, 'history', history}
    if o[9] then  -- paid late: the finalizer will turn this into PAID_AFTER_EXPIRY
      table.insert(ev, 'payment_id'); table.insert(ev, o[9])
    end
    rcall('XADD', unpack(ev))
    released = released + 1
    units = units + qty
  end
  -- Released, not held any more, or a corrupt record (checked before any write: it keeps its
  -- units held, never oversold, and the audit reports the mismatch): out of the index. A
  -- record that is not there stays in: during a cluster slot migration it may simply not have
  -- moved yet, and dropping its hold would strand its units.
  if o[1] and (o[1] ~= 'HELD' or o[8] ~= '1') then
    rcall('ZREM', KEYS[3], oid)
    removed = removed + 1
  end
end
return {released, units, #due, removed}
