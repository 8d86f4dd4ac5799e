--[[ set_rules: replace the runtime rules every gateway applies, when their version is still the
  one the caller read (compare and set: after a concurrent change the caller reads, merges and
  tries again), record the change (who, from where, before, after) and publish it. With
  expected_version -1 (seeding at start-up) the rules are set only when there are none, as
  version 0, and nothing is recorded or published. Time from the server's TIME.

  KEYS[1] fg:{rules} (hash)          version, rules (JSON object)
  KEYS[2] fg:{rules}:history (list)  {"at","by","client","before","after"} JSON, newest first
  ARGV[1] expected_version   ARGV[2] rules (JSON object)   ARGV[3] channel (of notices)
  ARGV[4] history_kept   ARGV[5] by (operator name)
  ARGV[6] client (address, "" = unknown: null in the entry)
  by and client go into the JSON through cjson.encode, whatever they hold.

  Returns {code, version, rules}: 1 SET, 0 STALE; the version and rules in force (-1 and ""
    when there are none)
]]
local rcall = redis.call
local cur = rcall('HMGET', KEYS[1], 'version', 'rules')
if ARGV[1] == '-1' then
  if cur[1] then
    return {0, tonumber(cur[1]), cur[2]}
  end
  rcall('HSET', KEYS[1], 'version', 0, 'rules', ARGV[2])
  return {1, 0, ARGV[2]}
end
if cur[1] ~= ARGV[1] then
  return {0, tonumber(cur[1] or -1), cur[2] or ''}
end
local version = tonumber(cur[1]) + 1
local t = rcall('TIME')
local now_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local client = 'null'
if ARGV[6] ~= '' then
  client = cjson.encode(ARGV[6])
end
rcall('HSET', KEYS[1], 'version', version, 'rules', ARGV[2])
rcall('LPUSH', KEYS[2], '{"at":' .. now_ms .. ',"by":' .. cjson.encode(ARGV[5]) .. ',"client":'
  .. client .. ',"before":' .. cur[2] .. ',"after":' .. ARGV[2] .. '}')
rcall('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
rcall('PUBLISH', ARGV[3], 'rules')
return {1, version, ARGV[2]}
