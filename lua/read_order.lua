#!lua flags=no-writes
--[[ read_order: one order's record and, while it is QUEUED, what its place in its bucket's
  queue is computed from, read in one step: O(1) whatever the queue's length.

  KEYS[1] fg:{S}:o:<rand> (hash)   the order record (create_order.lua)
  KEYS[2] fg:{S}:sku (hash)        queue_out drain_rate drained_at (finalize.lua); draw
                                   starts_at (a fair start)

  Returns {record, queue}: record: status user_id sku_id quantity promotion_id created_at
    hold_expires_at history opens_at (empty: no such order); queue: queue_seq queue_out
    drain_rate drained_at now_ms [starts_at] (empty unless the order is QUEUED; a figure not
    known yet is ""); a pre-queued order whose SKU's draw is not done has no place yet:
    queue_seq "" and the SKU's starts_at (epoch s) after now_ms
]]
local rcall = redis.call
local o = rcall('HMGET', KEYS[1], 'status', 'user_id', 'sku_id', 'quantity', 'promotion_id',
  'created_at', 'hold_expires_at', 'history', 'opens_at', 'queue_seq')
if not o[1] then
  return {{}, {}}
end
local seq = o[10]
o[10] = nil
if o[1] ~= 'QUEUED' then
  return {o, {}}
end
local q = rcall('HMGET', KEYS[2], 'queue_out', 'drain_rate', 'drained_at', 'draw',
  'starts_at')
local t = rcall('TIME')
local now_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if not seq then
  if o[9] and (q[4] == 'pending' or q[4] == 'drawing') then
    return {o, {'', '', '', '', now_ms, q[5] or o[9]}}  -- waits for the draw to rank it
  end
  return {o, {}}
end
return {o, {seq, q[1] or '', q[2] or '', q[3] or '', now_ms}}
