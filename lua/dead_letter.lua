--[[ dead_letter: move one order-stream entry that keeps failing to the SKU's dead-letter
  stream with its reason, and acknowledge it, atomically. A dead "created" entry of a real
  order leaves the backlog and the queue too (once), so intake is not throttled by entries nobody
  processes and the orders behind it move up.

  KEYS[1] fg:{S}:stream (stream)   KEYS[2] fg:{S}:dead (stream)   KEYS[3] fg:{S}:sku (hash)
  KEYS[4] fg:{S}:o:<rand> (hash, optional) the order of a "created" entry
  ARGV[1] group (the consumer group)   ARGV[2] entry_id   ARGV[3] reason
  ARGV[4..] fields: the entry's fields and values, in pairs

  Returns {code}: 1 DEAD_LETTERED
]]
local rcall = redis.call
local dead = {KEYS[2], '*', 'entry_id', ARGV[2], 'reason', ARGV[3]}
for i = 4, #ARGV do
  table.insert(dead, ARGV[i])
end
if KEYS[4] and rcall('EXISTS', KEYS[4]) == 1 and not rcall('HGET', KEYS[4], 'drained') then
  rcall('HSET', KEYS[4], 'drained', '1')
  rcall('HINCRBY', KEYS[3], 'backlog', -1)
  rcall('HINCRBY', KEYS[3], 'queue_out', 1)  -- out of the queue: positions behind it move up
end
rcall('XADD', unpack(dead))
rcall('XACK', KEYS[1], ARGV[1], ARGV[2])
return {1}
