--[[ configure_sku: create a SKU or change its configuration, keeping
  stock == available + held + sold, and append who changed what to the SKU's audit log, in one
  atomic step. Checks before the first write: a refused change writes and records nothing.
  Time from the server's TIME (epoch ms).

  KEYS[1] fg:{S}:sku     (hash)   promotion_id stock available held sold per_user_limit
                                  starts_at ends_at (epoch s, optional)
  KEYS[2] fg:{S}:changes (stream) at by client action (created | updated), then
                                  before:<field> (updated only) and after:<field> for each of
                                  promotion_id stock per_user_limit starts_at ends_at
                                  ("" = no window bound); trimmed to about ARGV[8] entries
  ARGV[1] promotion_id  ARGV[2] stock  ARGV[3] per_user_limit
  ARGV[4] starts_at ("" = none)  ARGV[5] ends_at ("" = none)
  ARGV[6] by (operator name)  ARGV[7] client address ("" = unknown)  ARGV[8] changes kept

  Returns {code, detail}:
     1 CREATED            detail: 0
     2 UPDATED            detail: 0
    -1 STOCK_BELOW_COMMITTED  detail: units held plus sold
]]
local rcall = redis.call
local FIELDS = {'promotion_id', 'stock', 'per_user_limit', 'starts_at', 'ends_at'}
local stock = tonumber(ARGV[2])
local cur = rcall('HMGET', KEYS[1], 'held', 'sold', unpack(FIELDS))
local held = tonumber(cur[1] or '0')
local sold = tonumber(cur[2] or '0')
local existed = rcall('EXISTS', KEYS[1]) == 1
if stock < held + sold then
  return {-1, held + sold}
end
local t = rcall('TIME')
local now_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

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

local action = existed and 'updated' or 'created'
local entry = {'at', now_ms, 'by', ARGV[6], 'client', ARGV[7], 'action', action}
local after = {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]}
for i, name in ipairs(FIELDS) do
  if existed then
    entry[#entry + 1] = 'before:' .. name
    entry[#entry + 1] = cur[i + 2] or ''
  end
  entry[#entry + 1] = 'after:' .. name
  entry[#entry + 1] = after[i]
end
rcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', unpack(entry))
if existed then
  return {2, 0}
end
return {1, 0}
