--[[ create_order: idempotency claim, checks and enqueue of one order, atomically; in hold mode
  also the stock hold. Every check runs before the first write (scripts do not roll back).
  Time in epoch milliseconds, from the server's TIME unless now_ms is given.

  KEYS[1] fg:{S}:sku (hash)        promotion_id stock available held sold per_user_limit
                                   starts_at ends_at (epoch s, optional) backlog; queue_in
                                   (orders ever queued), queue_out, drain_rate (finalize.lua);
                                   a fair start's prequeue_s and draw (pending | drawing |
                                   done)
  KEYS[2] fg:{S}:users (hash)      user_id -> units held or bought
  KEYS[3] fg:{S}:holds (zset)      order_id -> hold deadline ms
  KEYS[4] fg:{S}:stream (stream)   order stream
  KEYS[5] fg:{S}:o:<rand> (hash)   the new order record
  KEYS[6] fg:{S}:idem:<user>:<key> (string) fingerprint "\n" order_id "\n" hold deadline ms
                                   (empty when QUEUED, "@<starts_at>" when pre-queued)
                                   ["\n" position when QUEUED, not pre-queued]: the first
                                   answer, rebuilt on replay;
                                   or "!\n<token>..." tokens of abandoned claims (fence_key.lua)
  KEYS[7] fg:{S}:accepted (zset)   "<key>:<user>" of every 202 -> replay deadline ms
  KEYS[8] fg:{S}:prequeue (set)    order ids pre-queued for the draw
  KEYS[9] fg:{S}:waiting (hash)    user_id -> units pre-queued, not yet drawn
  KEYS[10] fg:{u:<user>}:ik:<key> (string, optional) sku_id (cross-SKU key reuse guard)

  ARGV[1] order_id      ARGV[2] user_id   ARGV[3] sku_id   ARGV[4] quantity
  ARGV[5] promotion_id  ARGV[6] fingerprint (sku|quantity|promotion)
  ARGV[7] hold_ttl_ms   ARGV[8] idempotency_ttl_ms   ARGV[9] now_ms ("" = server TIME)
  ARGV[10] mode: "hold" (NORMAL: stock, limit and hold) | "queue" (QUEUE_ONLY: no stock read)
  ARGV[11] queue_max: most unprocessed orders (backlog) the SKU's stream may hold
  ARGV[12] accepted_member: "<key>:<user>", this request's member of the accepted set
  ARGV[13] claim_token: cluster mode: the token of this request's claim on (user, key)
           (claim_key.lua), "" if none
  ARGV[14] replay_only: "1": only a replay may answer (another request with this key is in
           progress)
  ARGV[15] buckets: how many stock buckets the gateway takes the SKU to have ("1": not
           bucketed); when the SKU's hash says otherwise nothing is written and the gateway
           asks again
  ARGV[16] durable: "1": the gateway waits for this connection's writes to be durable
           (WAITAOF): a replay then touches its record (a write), so the wait covers the order
           it answers

  Fair start (the SKU's draw is "pending" or "drawing"): no order takes stock before the draw
  is done. An order in [starts_at - prequeue_s, starts_at) is pre-queued (QUEUED, in the
  prequeue set, its units waiting); one at or after starts_at is QUEUED in either mode and
  decided by a finalizer once the draw is done. The per-user limit counts held, bought and
  waiting units. A pre-queued order's answer has "position": null and "opens_at".

  Returns {code, payload}:
     1 CREATED         payload: the 202 body (also stored for replays)
     2 REPLAYED        payload: the stored 202 body of the first request
    -1 UNKNOWN_SKU     payload: ""
    -2 NOT_ACTIVE      payload: "not_started" | "ended"
    -3 SOLD_OUT        payload: units available
    -4 LIMIT_EXCEEDED  payload: units the user already holds or bought
    -5 KEY_REUSED      payload: "" (same user and key, different request)
    -6 QUEUE_FULL      payload: the backlog
    -7 CLAIM_LOST      payload: "" (this request's claim was recovered as abandoned)
    -8 IN_USE          payload: "" (replay only, and nothing to replay yet)
    -9 LAYOUT          payload: the SKU's bucket count (the request went to the wrong bucket)
]]
local rcall = redis.call

-- The 202 body. A replay has the first request's fingerprint, so the same sku and quantity,
-- and rebuilds the same bytes from the stored order id, deadline and place in the queue.
local function answer(order_id, deadline_s, position)
  if string.sub(deadline_s, 1, 1) == '@' then  -- pre-queued: opens at the SKU's start
    return '{"order_id":"' .. order_id .. '","status":"QUEUED","sku_id":"' .. ARGV[3] ..
      '","quantity":' .. ARGV[4] .. ',"position":null,"opens_at":' ..
      string.sub(deadline_s, 2) .. '}'
  end
  if deadline_s ~= '' then
    return '{"order_id":"' .. order_id .. '","status":"HELD","sku_id":"' .. ARGV[3] ..
      '","quantity":' .. ARGV[4] .. ',"hold_expires_at":' .. deadline_s .. '}'
  end
  local place = position ~= '' and (',"position":' .. position) or ''
  return '{"order_id":"' .. order_id .. '","status":"QUEUED","sku_id":"' .. ARGV[3] ..
    '","quantity":' .. ARGV[4] .. place .. '}'
end

local stored = rcall('GET', KEYS[6])
if stored and string.sub(stored, 1, 2) == '!\n' then
  if ARGV[13] ~= '' and string.find(stored .. '\n', '\n' .. ARGV[13] .. '\n', 1, true) then
    return {-7, ''}
  end
  stored = nil  -- fences of other requests' claims: this key is evaluated afresh
end
if stored then
  local nl = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, nl - 1) == ARGV[6] then
    if ARGV[16] == '1' then
      rcall('PEXPIRE', KEYS[6], rcall('PTTL', KEYS[6]))
    end
    local nl2 = string.find(stored, '\n', nl + 1, true)
    local nl3 = string.find(stored, '\n', nl2 + 1, true)  -- a QUEUED answer's position
    return {2, answer(string.sub(stored, nl + 1, nl2 - 1),
      string.sub(stored, nl2 + 1, (nl3 or 0) - 1), nl3 and string.sub(stored, nl3 + 1) or '')}
  end
  return {-5, ''}
end
if ARGV[14] == '1' then
  local buckets = rcall('HGET', KEYS[1], 'buckets') or '1'
  if buckets ~= ARGV[15] then
    return {-9, buckets}  -- not found here because these may be another shopper's bucket
  end
  return {-8, ''}
end
if KEYS[10] then
  local first_sku = rcall('GET', KEYS[10])
  if first_sku and first_sku ~= ARGV[3] then
    return {-5, ''}
  end
end

local cfg = rcall('HMGET', KEYS[1], 'promotion_id', 'available', 'per_user_limit',
  'starts_at', 'ends_at', 'backlog', 'buckets', 'draw', 'prequeue_s', 'held', 'queue_in',
  'queue_out', 'drain_rate')
if (cfg[7] or '1') ~= ARGV[15] then
  -- Another bucket count than the gateway took: these keys may not be this shopper's bucket.
  -- Only reads so far, and a replay found above is right (its record is in this shopper's
  -- bucket whatever the count).
  return {-9, cfg[7] or '1'}
end
if not cfg[1] or cfg[1] ~= ARGV[5] then
  return {-1, ''}
end

local now
if ARGV[9] ~= '' then
  now = tonumber(ARGV[9])
else
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local draw_pending = cfg[8] == 'pending' or cfg[8] == 'drawing'
local early = false  -- pre-queued for the draw
if cfg[4] and now < tonumber(cfg[4]) * 1000 then
  if cfg[8] ~= 'pending' or now < (tonumber(cfg[4]) - tonumber(cfg[9] or '0')) * 1000 then
    return {-2, 'not_started'}
  end
  early = true
end
if cfg[5] and now >= tonumber(cfg[5]) * 1000 then
  return {-2, 'ended'}
end

local hold = ARGV[10] == 'hold' and not draw_pending
local qty = tonumber(ARGV[4])
if draw_pending then
  local owned = tonumber(rcall('HGET', KEYS[2], ARGV[2]) or '0') +
    tonumber(rcall('HGET', KEYS[9], ARGV[2]) or '0')
  if owned + qty > tonumber(cfg[3]) then
    return {-4, tostring(owned)}
  end
end
if hold then
  local available = tonumber(cfg[2])
  if available < qty then
    return {-3, tostring(available)}
  end
  local owned = tonumber(rcall('HGET', KEYS[2], ARGV[2]) or '0')
  if owned + qty > tonumber(cfg[3]) then
    return {-4, tostring(owned)}
  end
end
local backlog = tonumber(cfg[6] or '0')
if backlog >= tonumber(ARGV[11]) then
  return {-6, tostring(backlog)}
end

-- all checks passed: write. The SKU's counters (read above) are written by one HSET and the
-- order's record by another: every write command a script makes is run, counted and appended
-- to the AOF on its own. A held order makes four writes and one read fewer than with one
-- command per field, about 2.5 µs of the ~40 the server spends on it.
local function put(fields, name, value)
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
local now_s = string.format('%d', now)
local status, deadline_s = 'QUEUED', ''
local record = {}
-- The order's place in its bucket's queue: orders ever queued here (queue_in, started at the
-- backlog when missing) less those drained (queue_out): read_order.lua subtracts again. A
-- pre-queued order counts in queue_in (it is ahead of every order after the start) but has
-- no place until the draw ranks it (draw_decide.lua counts it out).
local out = tonumber(cfg[12] or '0')
local seq = cfg[11] and tonumber(cfg[11]) + 1 or out + backlog + 1
local counters = {'backlog', string.format('%d', backlog + 1), 'queue_in', string.format('%d', seq)}
if hold then
  local deadline = now + tonumber(ARGV[7])
  deadline_s = string.format('%d', deadline)
  status = 'HELD'
  put(counters, 'available', string.format('%d', tonumber(cfg[2]) - qty))
  put(counters, 'held', string.format('%d', tonumber(cfg[10] or '0') + qty))
  rcall('HINCRBY', KEYS[2], ARGV[2], qty)
  rcall('ZADD', KEYS[3], deadline, ARGV[1])
  put(record, 'hold_expires_at', deadline_s)
elseif early then
  deadline_s = '@' .. cfg[4]
  rcall('SADD', KEYS[8], ARGV[1])
  rcall('HINCRBY', KEYS[9], ARGV[2], qty)
  put(record, 'opens_at', cfg[4])
end
rcall('HSET', KEYS[1], unpack(counters))
local position = ''
if not hold and not early then
  position = string.format('%d', math.max(1, seq - out))
  put(record, 'queue_seq', string.format('%d', seq))
  if cfg[13] and tonumber(cfg[13]) > 0 then  -- the ETA told now, for the ETA error (finalize.lua)
    local eta_ms = math.floor(tonumber(position) * 1000 / tonumber(cfg[13]))
    put(record, 'queue_eta_ms', string.format('%d', eta_ms))
  end
end
rcall('HSET', KEYS[5], 'status', status, 'user_id', ARGV[2], 'sku_id', ARGV[3],
  'quantity', ARGV[4], 'promotion_id', ARGV[5], 'created_at', now_s,
  'history', '[{"from":null,"to":"' .. status .. '","at":' .. now_s .. '}]', unpack(record))
local replay_until = now + tonumber(ARGV[8])
local first = ARGV[6] .. '\n' .. ARGV[1] .. '\n' .. deadline_s
rcall('SET', KEYS[6], position ~= '' and (first .. '\n' .. position) or first, 'PX', ARGV[8])
rcall('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
rcall('ZADD', KEYS[7], replay_until, ARGV[12])
if KEYS[10] then
  rcall('SET', KEYS[10], ARGV[3], 'PX', ARGV[8])
end
rcall('XADD', KEYS[4], '*', 'order_id', ARGV[1], 'event', 'created')
return {1, answer(ARGV[1], deadline_s, position)}
