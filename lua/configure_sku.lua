--[[ configure_sku: create a SKU or change its configuration, keeping
  stock == available + held + sold, and append who changed what to the SKU's audit log, in one
  atomic step. Checks before the first write: a refused change writes and records nothing.
  Time from the server's TIME (epoch ms).

  KEYS[1] fg:{S}:sku (hash)       promotion_id stock available held sold per_user_limit
                                  starts_at ends_at (epoch s, optional) prequeue_s
                                  draw (pending | drawing | done) draw_seed draw_commitment
  KEYS[2] fg:{S}:changes (stream) at by client action (created | updated), then
                                  before:<field> (updated only) and after:<field> for each of
                                  promotion_id stock per_user_limit starts_at ends_at
                                  prequeue_s ("" = no window bound); trimmed to about changes_kept entries
  ARGV[1] promotion_id  ARGV[2] stock  ARGV[3] per_user_limit
  ARGV[4] starts_at ("" = none)  ARGV[5] ends_at ("" = none)
  ARGV[6] by (operator name)  ARGV[7] client (address, "" = unknown)  ARGV[8] changes_kept
  ARGV[9] stock_mode: how the stock is set: "set" (stock is the stock: a SKU without buckets)
          | "init" (a new bucket starts with stock; an existing one keeps its stock: buckets
          1..K-1 of a bucketed SKU) | "total" (bucket 0 of a bucketed SKU: a new one starts with
          stock, its share; an existing one changes by the difference between total_stock and
          the stored total, so two changes at once cannot both apply a difference)
  ARGV[10] buckets: the SKU's bucket count as the caller takes it ("" = any): refused (-2,
           nothing written) when the stored one differs; stored when more than 1
  ARGV[11] total_stock: a bucketed SKU's new total stock (bucket 0; "" otherwise): stored as
           total_stock and logged as its stock
  ARGV[12] log_change: "1": append the change to the changes stream | "0": do not (buckets
           other than 0)
  ARGV[13] prequeue_s: the fair start's pre-queue window in seconds ("0" = off)
  ARGV[14] draw_seed: a fresh 32-byte seed, hex, stored with draw_commitment and the draw
           "pending" when prequeue_s > 0 and the SKU has no draw yet; an existing draw (and
           its seed) is never changed
  ARGV[15] draw_commitment: sha256 of the seed's bytes, hex

  Returns {code, detail}:
     1 CREATED                detail: 0
     2 UPDATED                detail: 0
    -1 STOCK_BELOW_COMMITTED  detail: units held plus sold
    -2 BUCKETS_FIXED          detail: the stored bucket count
]]
local rcall = redis.call
for i = 9, 15 do
  ARGV[i] = ARGV[i] or ({'set', '', '', '1', '0', '', ''})[i - 8]  -- callers of the short forms
end
local FIELDS = {'promotion_id', 'stock', 'per_user_limit', 'starts_at', 'ends_at', 'prequeue_s'}
local cur = rcall('HMGET', KEYS[1], 'held', 'sold', unpack(FIELDS))
local more = rcall('HMGET', KEYS[1], 'buckets', 'total_stock')
local held = tonumber(cur[1] or '0')
local sold = tonumber(cur[2] or '0')
local existed = cur[3] ~= false
if existed and ARGV[10] ~= '' and (more[1] or '1') ~= ARGV[10] then
  return {-2, tonumber(more[1] or '1')}
end
local stock = tonumber(ARGV[2])
if existed and ARGV[9] == 'init' then
  stock = tonumber(cur[4])
elseif existed and ARGV[9] == 'total' then
  stock = tonumber(cur[4]) + tonumber(ARGV[11]) - tonumber(more[2] or cur[4])
end
if stock < held + sold then
  return {-1, held + sold}
end
local logged_stock = ARGV[2]
if ARGV[11] ~= '' then
  cur[4] = more[2] or cur[4]  -- the change log shows the SKU's totals
  logged_stock = ARGV[11]
  rcall('HSET', KEYS[1], 'total_stock', ARGV[11])
end
if ARGV[10] ~= '' and ARGV[10] ~= '1' then
  rcall('HSET', KEYS[1], 'buckets', ARGV[10])
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
if ARGV[13] ~= '0' then
  rcall('HSET', KEYS[1], 'prequeue_s', ARGV[13])
  if ARGV[14] ~= '' and rcall('HEXISTS', KEYS[1], 'draw') == 0 then
    rcall('HSET', KEYS[1], 'draw', 'pending', 'draw_seed', ARGV[14],
      'draw_commitment', ARGV[15])
  end
else
  rcall('HDEL', KEYS[1], 'prequeue_s')
end

if ARGV[12] == '0' then
  return {existed and 2 or 1, 0}
end
local action = existed and 'updated' or 'created'
local entry = {'at', now_ms, 'by', ARGV[6], 'client', ARGV[7], 'action', action}
local after = {ARGV[1], logged_stock, ARGV[3], ARGV[4], ARGV[5], ARGV[13]}
for i, name in ipairs(FIELDS) do
  if existed then
    entry[#entry + 1] = 'before:' .. name
    entry[#entry + 1] = cur[i + 2] or (name == 'prequeue_s' and '0' or '')
  end
  entry[#entry + 1] = 'after:' .. name
  entry[#entry + 1] = after[i]
end
rcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', unpack(entry))
if existed then
  return {2, 0}
end
return {1, 0}
