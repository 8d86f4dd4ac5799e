#!lua flags=no-writes
--[[ read_order: one order's record and, while it is QUEUED, what its place in its bucket's
  queue is computed from, read in one step: O(1) whatever the queue's length.

  KEYS[1] fg:{S}:o:<rand> (hash)   the order record (create_order.lua)
  KEYS[2] fg:{S}:sku (hash)        queue_out drain_rate drained_at (finalize.lua)

  Returns {record, queue}: record: status user_id sku_id quantity promotion_id created_at
    hold_expires_at history (empty: no such order); queue: queue_seq queue_out drain_rate
    drained_at now_ms (empty unless the order is QUEUED; a figure not known yet is "")
]]
local rcall = redis.call
local o = rcall('HMGET', KEYS[1], 'status', 'user_id', 'sku_id', 'quantity', 'promotion_id',
  'created_at', 'hold_expires_at', 'history', 'queue_seq')
if not o[1] then
  return {{}, {}}
end
local seq = o[9]
o[9] = nil
if o[1] ~= 'QUEUED' or not seq then
  return {o, {}}
end
local q = rcall('HMGET', KEYS[2], 'queue_out', 'drain_rate', 'drained_at')
local t = rcall('TIME')
return {o, {seq, q[1] or '', q[2] or '', q[3] or '',
  string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}}
