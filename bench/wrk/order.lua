-- wrk script for the order endpoint: one new shopper and key per request (BENCH_KIND=unique),
-- or keys accepted before, read from BENCH_PAIRS (BENCH_KIND=replay: every answer a replay).
-- Prints one JSON line at the end: requests, seconds, non-2xx answers, socket errors.
local sku = os.getenv("BENCH_SKU") or "bench-intake"
local promo = os.getenv("BENCH_PROMO") or "bench"
local kind = os.getenv("BENCH_KIND") or "unique"
local path = os.getenv("BENCH_PATH") or "/api/v1/order/create"
-- BENCH_RUN: 8 hex digits unique to this run, so no two runs share a key
local run = os.getenv("BENCH_RUN") or string.format("%08x", os.time() % 0x7fffffff)
local counter = 0
local pairs_list = {}

if kind == "replay" then
  for line in io.lines(os.getenv("BENCH_PAIRS")) do
    local user, key = line:match("(%S+)%s+(%S+)")
    if user then pairs_list[#pairs_list + 1] = {user, key} end
  end
end

local function body(user)
  return string.format('{"user_id":"%s","sku_id":"%s","quantity":1,"promotion_id":"%s"}',
    user, sku, promo)
end

request = function()
  counter = counter + 1
  local user, key
  if kind == "replay" then
    local pair = pairs_list[(counter - 1) % #pairs_list + 1]
    user, key = pair[1], pair[2]
  else
    key = string.format("%s-0000-4000-8000-%012x", run, counter)
    user = "w" .. run .. counter
  end
  return wrk.format("POST", path,
    {["Content-Type"] = "application/json", ["X-Idempotency-Key"] = key}, body(user))
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"non_2xx":%d,"socket_errors":%d,"latency_p50_ms":%.3f,"latency_p99_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
