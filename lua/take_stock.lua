--[[ take_stock: the first half of moving available stock from one bucket of a hot SKU to
  another (README "Hot-SKU buckets"): the units leave this bucket's stock and available, and
  the transfer is written to this bucket's journal in the same atomic step, so a mover that
  dies before give_stock.lua leaves a record the sweeper completes. stock == available + held
  + sold holds in this bucket before and after.

  KEYS[1] fg:{B}:sku (hash)   KEYS[2] fg:{B}:transfers (hash) id -> "<units>\n<to tag>\n<at ms>"
  ARGV[1] transfer_id   ARGV[2] units: needed   ARGV[3] to_tag: the receiving bucket's tag
  ARGV[4] now_ms ("" = server TIME)

  Takes the units needed, or what is available when that is less: never more, so no bucket
  gets stock its shoppers did not ask for. A caller that found nothing anywhere looks again
  while a transfer is in flight or one landed during its look, so a shopper is never refused
  while stock is moving.

  Returns {units, in_flight, received}: units taken, transfers out of this bucket in flight,
    transfers this bucket ever received
]]
local rcall = redis.call
local h = rcall('HMGET', KEYS[1], 'available', 'transfers_in')
local available = tonumber(h[1] or '0')
local received = tonumber(h[2] or '0')
if available <= 0 then
  return {0, rcall('HLEN', KEYS[2]), received}
end
local units = math.min(available, tonumber(ARGV[2]))
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
rcall('HINCRBY', KEYS[1], 'available', -units)
rcall('HINCRBY', KEYS[1], 'stock', -units)
rcall('HSET', KEYS[2], ARGV[1], units .. '\n' .. ARGV[3] .. '\n' .. string.format('%d', now))
return {units, 0, received}
