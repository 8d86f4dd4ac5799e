--[[ draw_open: open (or resume) a SKU's fair-start draw once the sale starts. Opening closes the
  pre-queue (create_order.lua adds no order to it after this, so every drawer ranks the same
  orders) and fixes its size; the seed goes to the drawer, never to a shopper before the draw
  is done. Time in epoch milliseconds.

  KEYS[1] fg:{S}:sku (hash)        draw (pending | drawing | done) draw_seed starts_at
                                   draw_total draw_cursor (orders decided so far)
                                   draw_opened_at drawn_at (epoch ms)
  KEYS[2] fg:{S}:prequeue (set)    order ids pre-queued for the draw
  ARGV[1] now_ms ("" = server TIME)

  Returns {code, cursor, total, seed}:
     1 DRAWING    the draw is open: decide from cursor (draw_decide.lua) up to total
     2 DONE       every pre-queued order was decided (cursor = total)
    -1 NO_DRAW    the SKU has no fair start (cursor, total 0, seed "")
    -2 NOT_DUE    the sale has not started yet (cursor, total 0, seed "")
]]
local rcall = redis.call
local h = rcall('HMGET', KEYS[1], 'draw', 'draw_seed', 'starts_at', 'draw_total', 'draw_cursor')
if not h[1] then
  return {-1, 0, 0, ''}
end
if h[1] == 'pending' then
  local now
  if ARGV[1] ~= '' then
    now = tonumber(ARGV[1])
  else
    local t = rcall('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  if h[3] and now < tonumber(h[3]) * 1000 then
    return {-2, 0, 0, ''}
  end
  local total = rcall('SCARD', KEYS[2])
  local now_s = string.format('%d', now)
  h[1], h[4], h[5] = 'drawing', total, 0
  rcall('HSET', KEYS[1], 'draw', 'drawing', 'draw_total', total, 'draw_cursor', 0,
    'draw_opened_at', now_s)
  if total == 0 then
    h[1] = 'done'
    rcall('HSET', KEYS[1], 'draw', 'done', 'drawn_at', now_s)
  end
end
local code = 1
if h[1] == 'done' then
  code = 2
end
return {code, tonumber(h[5]), tonumber(h[4]), h[2]}
