--[[ replay_dead: put one dead letter back on its SKU's order stream, atomically with taking it
  out of the dead-letter stream, so a finalizer processes it again (after a repair). The entry
  goes back with the fields it had; its order's backlog is not counted again (dead_letter.lua
  took a dead "created" entry out of it once, and finalize.lua counts it out only once).

  KEYS[1] fg:{S}:dead (stream)   KEYS[2] fg:{S}:stream (stream)
  ARGV[1] dead_id: the dead letter's id in KEYS[1]

  Returns {code, entry_id}: 1 REPLAYED, -1 NOT_FOUND
]]
local rcall = redis.call
local found = rcall('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return {-1, ''}
end
-- dead_letter.lua writes entry_id and reason first, then the entry's own fields
local fields = found[1][2]
local entry = {KEYS[2], '*'}
for i = 5, #fields do
  entry[#entry + 1] = fields[i]
end
if #entry == 2 then  -- an entry that had no fields of its own: a stream entry needs one
  entry[3], entry[4] = 'event', 'replayed'
end
local id = rcall('XADD', unpack(entry))
rcall('XDEL', KEYS[1], ARGV[1])
return {1, id}
