-- wrk script: POST /api/v1/order/create with a fresh idempotency key per request.
-- SKU and promotion from the environment: SKU=hot PROMO=p wrk -s bench/wrk_create.lua URL
local sku = os.getenv("SKU") or "hot"
local promo = os.getenv("PROMO") or "p"
local users = tonumber(os.getenv("USERS") or "1000")
local n = 0
math.randomseed(os.time())

request = function()
  n = n + 1
  local key = string.format("%08x-0000-4000-8000-%012x", math.random(0, 0x7fffffff), n)
  local body = '{"user_id":"u' .. (n % users) .. '","sku_id":"' .. sku ..
    '","quantity":1,"promotion_id":"' .. promo .. '"}'
  return wrk.format("POST", "/api/v1/order/create",
    {["X-Idempotency-Key"] = key, ["Content-Type"] = "application/json"}, body)
end
