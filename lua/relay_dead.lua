--[[ relay_dead: move one events-stream entry the relay's target keeps refusing (or that is not
  an event) to the SKU bucket's relay dead-letter stream with its reason, and acknowledge it,
  atomically. An entry no longer pending in the group (another relay confirmed or dead-lettered
  it meanwhile) is left alone.

  KEYS[1] fg:{S}:events (stream)   KEYS[2] fg:{S}:relay-dead (stream)
  ARGV[1] group (the relay's consumer group)   ARGV[2] entry_id   ARGV[3] event_id
  ARGV[4] reason   ARGV[5..] fields: the entry's fields and values, in pairs

  Returns {code}: 1 DEAD_LETTERED, 0 NOT_PENDING
]]
local rcall = redis.call
if rcall('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return {0}
end
local dead = {KEYS[2], '*', 'entry_id', ARGV[2], 'event_id', ARGV[3], 'group', ARGV[1],
  'reason', ARGV[4]}
for i = 5, #ARGV do
  table.insert(dead, ARGV[i])
end
rcall('XADD', unpack(dead))
return {1}
