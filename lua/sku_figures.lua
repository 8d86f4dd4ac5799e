--[[ sku_figures: the figures of SKUs (or stock buckets) for the people on call, read only:
  what `flashgate status`, /metrics and the console show. A pass over every SKU is one
  pipelined write of calls of a few dozen SKUs each on a single server (one SKU a call on a
  cluster, where a call's keys share a slot): each call is short, and other clients' commands
  are served between them. Entries ever added to a stream cost the most, so they are read only
  when asked for: from a consumer group's entries-read + lag where one knows both (XINFO GROUPS
  costs about half of XINFO STREAM, which also builds the first and last entries), else from
  XINFO STREAM.

  KEYS[1] fg:{S}:sku (hash)   KEYS[2] fg:{S}:stream (stream)   KEYS[3] fg:{S}:events (stream)
  KEYS[4] fg:{S}:dead (stream)   KEYS[5] fg:{S}:holds (zset)   KEYS[6] fg:{S}:prequeue (set)
  then the same six keys of each further SKU, in the order of the reply
  ARGV[1] group: the finalizers' consumer group on the order stream
  ARGV[2] streams: 0: no entries counted (0 answered for both), 1: the order stream's,
    2: the order stream's and the events stream's

  Returns {stock, available, held, sold, holds, backlog, pending, dead, entries_in,
    entries_out, buckets, total_stock, drain_rate_milli, draw_state, prequeued, drawn}
    of each SKU, one after the other in one flat list, in the order of KEYS (a flat list of
    integers: nothing for the client to allocate per SKU): entries_in and entries_out are
    the entries ever added to the order stream and the events stream; drain_rate_milli the
    finalizers' drain rate (orders per second, an EWMA) times 1,000, as an integer;
    draw_state the fair start's draw (0: none, 1: pending, 2: drawing, 3: done), prequeued
    the orders in its pre-queue (fixed once the draw opens), drawn the ones it decided so far
    (its cursor); all 0 (buckets 0) for a SKU not configured
]]
local rcall = redis.call
local group, streams = ARGV[1], tonumber(ARGV[2])
local DRAW_STATES = {pending = 1, drawing = 2, done = 3}

-- entries added to `key` (0 when it does not exist) and the pending count of `name` on it
local function added(key, name)
  if rcall('EXISTS', key) == 0 then
    return 0, 0
  end
  local total, pending = nil, 0
  for _, g in ipairs(rcall('XINFO', 'GROUPS', key)) do
    local fields = {}
    for i = 1, #g, 2 do
      fields[g[i]] = g[i + 1]
    end
    if fields['name'] == name then
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

local replies, FIELDS = {}, 16

-- the figures of the SKU (or bucket) whose six keys follow KEYS[k], appended to `replies`
local function figures(k)
  local n = #replies
  local f = rcall('HMGET', KEYS[k + 1], 'stock', 'available', 'held', 'sold', 'backlog',
    'buckets', 'total_stock', 'drain_rate', 'draw', 'draw_total', 'draw_cursor')
  if not f[1] then
    for i = n + 1, n + FIELDS do
      replies[i] = 0
    end
    return
  end
  local entries_in, entries_out, pending = 0, 0, 0
  if streams >= 1 then
    entries_in, pending = added(KEYS[k + 2], group)
  elseif rcall('EXISTS', KEYS[k + 2]) == 1 then
    local summary = redis.pcall('XPENDING', KEYS[k + 2], group)
    if type(summary) == 'table' and summary.err == nil then
      pending = summary[1]
    end
  end
  if streams >= 2 then
    entries_out = added(KEYS[k + 3], '')
  end
  local draw_state, prequeued = DRAW_STATES[f[9]] or 0, tonumber(f[10])
  if draw_state == 1 or (draw_state > 1 and not prequeued) then
    prequeued = rcall('SCARD', KEYS[k + 6]) -- the pre-queue still open (O(1))
  end
  local row = {
    tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0, tonumber(f[4]) or 0,
    rcall('ZCARD', KEYS[k + 5]), tonumber(f[5]) or 0, pending, rcall('XLEN', KEYS[k + 4]),
    entries_in, entries_out, tonumber(f[6]) or 1, tonumber(f[7]) or 0,
    math.floor((tonumber(f[8]) or 0) * 1000), draw_state, prequeued or 0, tonumber(f[11]) or 0,
  }
  for i = 1, FIELDS do
    replies[n + i] = row[i]
  end
end

for k = 0, #KEYS - 1, 6 do
  figures(k)
end
return replies
