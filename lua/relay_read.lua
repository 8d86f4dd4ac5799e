--[[ relay_read: the next entries of one events stream for one relay, so that one relay at a
  time delivers a stream (commit order per stream, relays sharing the work by stream). First
  entries idle for min_idle_ms (left by a relay that died) are claimed; then, while another
  consumer of the group still holds entries, nothing is read (BUSY); else this consumer's own
  pending entries, oldest first, or when it has none, up to `count` new ones.

  KEYS[1] fg:{S}:events (stream)
  ARGV[1] group   ARGV[2] consumer   ARGV[3] count   ARGV[4] min_idle_ms

  Returns {code, entries}: 1 READ, 0 BUSY; entries as XREADGROUP gives them ({id, fields})
]]
local rcall = redis.call
rcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', ARGV[3])
local summary = rcall('XPENDING', KEYS[1], ARGV[1])
if summary[1] > 0 then
  for _, holder in ipairs(summary[4]) do
    if holder[1] ~= ARGV[2] then
      return {0, {}}
    end
  end
end
local function read(from)
  local reply = rcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
    'STREAMS', KEYS[1], from)
  if not reply then
    return {}
  end
  return reply[1][2]
end
local entries = {}
if summary[1] > 0 then
  entries = read('0')
end
if #entries == 0 then
  entries = read('>')
end
return {1, entries}
