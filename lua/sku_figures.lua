--[[ sku_figures: one SKU's (or stock bucket's) figures for the people on call, read only:
  what `flashgate status`, /metrics and the console show. One call per bucket, so a pass over
  every SKU is one pipelined write of short calls that other clients' commands interleave.
  Entries ever added to a stream cost the most, so they are read only when asked for: from a
  consumer group's entries-read + lag where one knows both (XINFO GROUPS costs about half of
  XINFO STREAM, which also builds the first and last entries), else from XINFO STREAM.

  KEYS[1] fg:{S}:sku (hash)   KEYS[2] fg:{S}:stream (stream)   KEYS[3] fg:{S}:events (stream)
  KEYS[4] fg:{S}:dead (stream)   KEYS[5] fg:{S}:holds (zset)   KEYS[6] fg:{S}:prequeue (set)
  ARGV[1] group: the finalizers' consumer group on the order stream
  ARGV[2] streams: 0: no entries counted (0 answered for both), 1: the order stream's,
    2: the order stream's and the events stream's

  Returns {stock, available, held, sold, holds, backlog, pending, dead, entries_in,
    entries_out, buckets, total_stock, drain_rate_milli, draw_state, prequeued, drawn}:
    entries_in and entries_out are the entries ever added to the order stream and the events
    stream; drain_rate_milli the finalizers' drain rate (orders per second, an EWMA) times
    1,000, as an integer; draw_state the fair start's draw (0: none, 1: pending, 2: drawing,
    3: done), prequeued the orders in its pre-queue (fixed once the draw opens), drawn the
    ones it decided so far (its cursor); an empty reply for a SKU not configured
]]
local rcall = redis.call
local f = rcall('HMGET', KEYS[1], 'stock', 'available', 'held', 'sold', 'backlog', 'buckets',
  'total_stock', 'drain_rate', 'draw', 'draw_total', 'draw_cursor')
if not f[1] then
  return {}
end

-- entries added to `key` (0 when it does not exist) and the pending count of `group` on it
local function added(key, group)
  if rcall('EXISTS', key) == 0 then
    return 0, 0
  end
  local total, pending = nil, 0
  for _, g in ipairs(rcall('XINFO', 'GROUPS', key)) do
    local fields = {}
    for i = 1, #g, 2 do
      fields[g[i]] = g[i + 1]
    end
    if fields['name'] == group then
      pending = fields['pending']
    end
    local read, lag = fields['entries-read'], fields['lag']
    if type(read) ~= 'number' and fields['last-delivered-id'] == '0-0' then
      read = 0 -- a group that has read nothing yet: its lag is every entry
    end
    if total == nil and type(read) == 'number' and type(lag) == 'number' then
      total = read + lag
    end
  end
  if total == nil then
    local info = rcall('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
      if info[i] == 'entries-added' then
        total = info[i + 1]
      end
    end
  end
  return total or 0, pending
end

local streams = tonumber(ARGV[2])
local entries_in, entries_out, pending = 0, 0, 0
if streams >= 1 then
  entries_in, pending = added(KEYS[2], ARGV[1])
else
  local summary = redis.pcall('XPENDING', KEYS[2], ARGV[1])
  if type(summary) == 'table' and summary.err == nil then
    pending = summary[1]
  end
end
if streams >= 2 then
  entries_out = added(KEYS[3], '')
end
local DRAW_STATES = {pending = 1, drawing = 2, done = 3}
local draw_state, prequeued = DRAW_STATES[f[9]] or 0, tonumber(f[10])
if draw_state == 1 or (draw_state > 1 and not prequeued) then
  prequeued = rcall('SCARD', KEYS[6])  -- the pre-queue still open (O(1))
end
return {
  tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0, tonumber(f[4]) or 0,
  rcall('ZCARD', KEYS[5]), tonumber(f[5]) or 0, pending, rcall('XLEN', KEYS[4]),
  entries_in, entries_out, tonumber(f[6]) or 1, tonumber(f[7]) or 0,
  math.floor((tonumber(f[8]) or 0) * 1000), draw_state, prequeued or 0, tonumber(f[11]) or 0,
}
