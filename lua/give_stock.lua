--[[ give_stock: the second half of a stock transfer between buckets (see take_stock.lua): the
  units join this bucket's stock and available, once per transfer id however often it is sent
  (the mover and the sweeper may both complete one transfer); transfers_in counts arrivals.

  KEYS[1] fg:{B}:sku (hash)   KEYS[2] fg:{B}:received (zset) transfer id -> received at ms
  ARGV[1] transfer_id   ARGV[2] units   ARGV[3] now_ms ("" = server TIME)
  ARGV[4] received_kept_ms: how long a received id is remembered

  Returns code: 1 GIVEN (applied now), 0 ALREADY_GIVEN (applied before)
]]
local rcall = redis.call
if rcall('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local units = tonumber(ARGV[2])
rcall('HINCRBY', KEYS[1], 'available', units)
rcall('HINCRBY', KEYS[1], 'stock', units)
rcall('HINCRBY', KEYS[1], 'transfers_in', 1)
rcall('ZADD', KEYS[2], now, ARGV[1])
rcall('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
return 1
