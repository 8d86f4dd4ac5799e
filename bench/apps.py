"""The benchmark's reference servers, run under the same uvicorn settings as the gateway.

`bare_app`: the ceiling of the stack. One Starlette JSON endpoint at the order path that does
what any real handler does before its own work: reads the body, decodes and validates it into
the order's Struct, reads the idempotency key, and answers a JSON object the size of an
accepted order's, without Redis.

`naive_app`: the design flashgate replaces. Four separate steps, one Redis round trip each:
check the stock, lock the shopper, create the order, deduct the stock. On the same client path
as the gateway, so the comparison is of the design, not of the client. Under concurrent load
the check and the deduction interleave and it oversells; `BENCH_NAIVE_SKU` names its stock key.
"""

from __future__ import annotations

import os
import uuid

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.schemas import OrderRequest
from gateway.transport.wire import Multiplexed

PATH = "/api/v1/order/create"
_decode = msgspec.json.Decoder(OrderRequest).decode
_encode = msgspec.json.encode


def bare_app() -> Starlette:
    async def order(request: Request) -> Response:
        req = _decode(await request.body())
        key = request.headers.get("x-idempotency-key")
        if key is None:
            return Response(b'{"error":"invalid_request"}', 400, media_type="application/json")
        return Response(
            _encode(
                {
                    "order_id": "x3kq7m2a4b6c5d2e4f6g7h2j3n." + req.sku_id,
                    "status": "HELD",
                    "sku_id": req.sku_id,
                    "quantity": req.quantity,
                    "hold_expires_at": 1767225600000,
                }
            ),
            status_code=202,
            media_type="application/json",
        )

    return Starlette(routes=[Route(PATH, order, methods=["POST"])])


def naive_app() -> Starlette:
    redis = Multiplexed(os.environ["REDIS_URL"], timeout_s=5.0)

    async def order(request: Request) -> Response:
        req = _decode(await request.body())
        stock_key = f"naive:{{{req.sku_id}}}:stock"
        stock = await redis.execute_command("GET", stock_key)  # 1. check the stock
        if stock is None or int(stock) < req.quantity:
            return Response(b'{"error":"sold_out"}', 409, media_type="application/json")
        lock = f"naive:{{{req.sku_id}}}:lock:{req.user_id}"
        if not await redis.execute_command("SET", lock, 1, "NX", "EX", 900):  # 2. lock
            return Response(b'{"error":"limit_exceeded"}', 409, media_type="application/json")
        order_id = uuid.uuid4().hex
        await redis.execute_command(  # 3. create the order
            "RPUSH", f"naive:{{{req.sku_id}}}:orders", f"{order_id}|{req.user_id}"
        )
        await redis.execute_command("DECRBY", stock_key, req.quantity)  # 4. deduct
        return Response(
            _encode({"order_id": order_id, "status": "HELD"}),
            status_code=202,
            media_type="application/json",
        )

    return Starlette(routes=[Route(PATH, order, methods=["POST"])])
