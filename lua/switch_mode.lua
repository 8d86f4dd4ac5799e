--[[ switch_mode: set the intake mode shared by every gateway, record the change (who, from
  where), publish it. A switch to the current mode changes and records nothing. Time from the
  server's TIME.

  KEYS[1] fg:{mode} (hash)         mode changed_at (epoch ms)
  KEYS[2] fg:{mode}:history (list) {"from","to","at","by","client"} JSON, newest first
                                   (entries recorded before by/client existed lack them)
  ARGV[1] mode: the new one ("NORMAL" | "QUEUE_ONLY")   ARGV[2] channel (of notices)
  ARGV[3] history_kept   ARGV[4] by (operator name)
  ARGV[5] client (address, "" = unknown: null in the entry)
  by and client go into the JSON through cjson.encode, whatever they hold.

  Returns {changed, mode, changed_at}: changed 1 | 0, the mode now, changed_at epoch ms ("" =
    never switched)
]]
local rcall = redis.call
local cur = rcall('HMGET', KEYS[1], 'mode', 'changed_at')
local old = cur[1] or 'NORMAL'
if old == ARGV[1] then
  return {0, old, cur[2] or ''}
end
local t = rcall('TIME')
local now_s = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local client = 'null'
if ARGV[5] ~= '' then
  client = cjson.encode(ARGV[5])
end
rcall('HSET', KEYS[1], 'mode', ARGV[1], 'changed_at', now_s)
rcall('LPUSH', KEYS[2], '{"from":"' .. old .. '","to":"' .. ARGV[1] .. '","at":' .. now_s
  .. ',"by":' .. cjson.encode(ARGV[4]) .. ',"client":' .. client .. '}')
rcall('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
rcall('PUBLISH', ARGV[2], 'mode')
return {1, ARGV[1], now_s}
