#!lua flags=no-writes
--[[ audit_sku: a consistent snapshot of one SKU's inventory figures and the holds behind them.
  Reads the order records named by the holds index; they share the SKU's hash tag.

  KEYS[1] fg:{S}:sku (hash)   KEYS[2] fg:{S}:users (hash)   KEYS[3] fg:{S}:holds (zset)
  ARGV[1] orders_prefix: the order-record key prefix of S ("fg:{S}:o:")

  Returns {exists, stock, available, held, sold, users_total, holds_count, holds_units,
           holds_not_held, earliest_deadline_ms, backlog}: all integers; exists 0: the SKU is
           not configured (the rest 0); earliest_deadline_ms 0: no hold with a deadline
]]
local rcall = redis.call
local h = rcall('HMGET', KEYS[1], 'stock', 'available', 'held', 'sold', 'backlog')
if not h[1] then
  return {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
local users_total = 0
for _, v in ipairs(rcall('HVALS', KEYS[2])) do
  users_total = users_total + tonumber(v)
end
local holds = rcall('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
local units, not_held, earliest = 0, 0, 0
for i = 1, #holds, 2 do
  local oid = holds[i]
  local dot = string.find(oid, '.', 1, true)
  local rec = rcall('HMGET', ARGV[1] .. string.sub(oid, 1, dot - 1), 'status', 'quantity')
  if rec[1] == 'HELD' then
    units = units + tonumber(rec[2])
  else
    not_held = not_held + 1
  end
end
local first = rcall('ZRANGEBYSCORE', KEYS[3], '-inf', '(+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if first[2] then
  earliest = tonumber(first[2])  -- holds paid in time carry +inf: they have no deadline
end
return {1, tonumber(h[1]), tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), users_total,
  #holds / 2, units, not_held, earliest, tonumber(h[5] or '0')}
