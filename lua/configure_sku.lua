--[[ configure_sku: create a SKU or change its configuration, keeping
  stock == available + held + sold. Checks before the first write.

  KEYS[1] fg:{S}:sku (hash)  promotion_id stock available held sold per_user_limit
                             starts_at ends_at (epoch s, optional)
  ARGV[1] promotion_id  ARGV[2] stock  ARGV[3] per_user_limit
  ARGV[4] starts_at ("" = none)  ARGV[5] ends_at ("" = none)

  Returns {code, detail}:
     1 CREATED            detail: 0
     2 UPDATED            detail: 0
    -1 STOCK_BELOW_COMMITTED  detail: units held plus sold
]]
local rcall = redis.call
local stock = tonumber(ARGV[2])
local held = tonumber(rcall('HGET', KEYS[1], 'held') or '0')
local sold = tonumber(rcall('HGET', KEYS[1], 'sold') or '0')
local existed = rcall('EXISTS', KEYS[1]) == 1
if stock < held + sold then
  return {-1, held + sold}
end
rcall('HSET', KEYS[1], 'promotion_id', ARGV[1], 'stock', stock,
  'available', stock - held - sold, 'held', held, 'sold', sold, 'per_user_limit', ARGV[3])
if ARGV[4] ~= '' then
  rcall('HSET', KEYS[1], 'starts_at', ARGV[4])
else
  rcall('HDEL', KEYS[1], 'starts_at')
end
if ARGV[5] ~= '' then
  rcall('HSET', KEYS[1], 'ends_at', ARGV[5])
else
  rcall('HDEL', KEYS[1], 'ends_at')
end
if existed then
  return {2, 0}
end
return {1, 0}
