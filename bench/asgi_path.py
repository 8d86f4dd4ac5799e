"""CPU per order of the gateway's own code: the ASGI app called in process, without uvicorn
and without a socket, on the real embedded server. What it measures is everything the
gateway adds around the one script call: the front door, intake policy, the store's builder,
the multiplexed client and the answer.

    python -m bench.asgi_path --orders 20000 --concurrency 64
    python -m bench.asgi_path --limits            # the per-user and per-address buckets on
    python -m bench.asgi_path --limits --proxied  # and the address from X-Forwarded-For

Prints one JSON line per scenario: CPU microseconds per order of this process (the server's
CPU is not counted) and orders per CPU-second. The `get_queued` and `get_held` scenarios read
orders back (`GET /api/v1/order/{id}`): a QUEUED order with its place in line (what every
shopper in line polls), and a HELD one; their figure is CPU microseconds per GET.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from typing import Any

import uvloop

from gateway.ops.embedded import EmbeddedServer
from gateway.settings import Settings
from gateway.web.app import create_app

TOKEN = "bench"


async def call(
    app: Any, method: str, path: str, body: bytes, headers: list[Any], query: bytes = b""
) -> int:
    """One request through the app; returns the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


PROXIED = False  # --proxied: each order names its client in X-Forwarded-For


def order(user: str, sku: str, key: str) -> tuple[bytes, list[Any]]:
    body = b'{"user_id":"%s","sku_id":"%s","quantity":1,"promotion_id":"p"}' % (
        user.encode(),
        sku.encode(),
    )
    headers = [(b"x-idempotency-key", key.encode())]
    if PROXIED:
        n = int(uuid.UUID(key)) % 2**24
        headers.append((b"x-forwarded-for", b"203.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255)))
    return body, headers


async def put_sku(app: Any, sku: str, stock: int) -> None:
    body = b'{"promotion_id":"p","stock":%d,"per_user_limit":1000000000}' % stock
    auth = [(b"authorization", b"Bearer " + TOKEN.encode())]
    status = await call(app, "PUT", f"/api/v1/admin/skus/{sku}", body, auth)
    assert status in (200, 201), status


async def drive(app: Any, requests: list[tuple[bytes, list[Any]]], concurrency: int) -> float:
    """CPU seconds of this process for all requests, `concurrency` at a time."""
    queue = iter(requests)
    statuses: dict[int, int] = {}

    async def worker() -> None:
        for body, headers in queue:
            s = await call(app, "POST", "/api/v1/order/create", body, headers)
            statuses[s] = statuses.get(s, 0) + 1

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.process_time() - started
    print(f"  statuses {statuses}", file=sys.stderr)
    return took


async def drive_gets(app: Any, order_ids: list[str], concurrency: int) -> float:
    """CPU seconds of this process to read every order once, `concurrency` at a time."""
    queue = iter(order_ids)
    statuses: dict[int, int] = {}

    async def worker() -> None:
        for oid in queue:
            s = await call(app, "GET", f"/api/v1/order/{oid}", b"", [])
            statuses[s] = statuses.get(s, 0) + 1

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.process_time() - started
    print(f"  statuses {statuses}", file=sys.stderr)
    return took


async def order_ids(redis: Any, sku: str, n: int) -> list[str]:
    """The ids of the first n orders of the SKU's stream."""
    entries = await redis.xrange(f"fg:{{{sku}}}:stream", count=n)
    return [fields[b"order_id"].decode() for _, fields in entries]


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedServer(d, persist=False)
        server.start()
        try:
            await run(server.url, args)
        finally:
            server.stop()


async def run(url: str, args: argparse.Namespace) -> None:
    limits: dict[str, Any] = {}
    if args.limits:  # on, and never refusing: what they cost, not what they refuse
        limits = {"user_qps": 1e9, "user_burst": 10**9, "client_qps": 1e9, "client_burst": 10**9}
    if args.proxied:
        limits["trusted_proxies"] = "127.0.0.1"
    settings = Settings(redis_url=url, admin_token=TOKEN, qps=1e9, burst=1_000_000_000, **limits)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await put_sku(app, "hot", 1_000_000_000)
        await put_sku(app, "gone", 1)
        n = args.orders
        fresh = [order(f"u{i}", "hot", str(uuid.uuid4())) for i in range(n)]
        replay_key = str(uuid.uuid4())
        replays = [order("r1", "hot", replay_key)] * n
        gone = [order(f"s{i}", "gone", str(uuid.uuid4())) for i in range(n + 1)]
        await drive(app, gone[:1], 1)  # the one unit goes; the rest is sold out
        for name, reqs in (("intake", fresh), ("replay", replays), ("soldout", gone[1:])):
            cpu = await drive(app, reqs, args.concurrency)
            row: dict[str, Any] = {"scenario": name, "limits": args.limits}
            row.update(proxied=args.proxied, cpu_us_per_order=round(cpu / n * 1e6, 2))
            row["orders_per_cpu_s"] = round(n / cpu)
            print(json.dumps(row), flush=True)
        await reads(app, url, args)


async def reads(app: Any, url: str, args: argparse.Namespace) -> None:
    """GET of QUEUED orders (a line with a known drain rate, no finalizer: they stay queued)
    and of HELD ones."""
    from redis.asyncio import Redis

    n = args.orders
    auth = [(b"authorization", b"Bearer " + TOKEN.encode())]
    await put_sku(app, "line", 1_000_000_000)
    status = await call(app, "POST", "/api/v1/order/switch", b"", auth, b"mode=QUEUE_ONLY")
    assert status == 200, status
    await drive(app, [order(f"q{i}", "line", str(uuid.uuid4())) for i in range(n)], 64)
    redis = Redis.from_url(url)
    try:
        await redis.hset("fg:{line}:sku", "drain_rate", "1000")
        queued = await order_ids(redis, "line", n)
        first = queued[0].partition(".")[0]
        assert await redis.hget(f"fg:{{line}}:o:{first}", "status") == b"QUEUED"
        held = await order_ids(redis, "hot", n)
    finally:
        await redis.aclose()
    for name, ids in (("get_queued", queued), ("get_held", held)):
        cpu = await drive_gets(app, ids, args.concurrency)
        row = {"scenario": name, "cpu_us_per_get": round(cpu / len(ids) * 1e6, 2)}
        row["gets_per_cpu_s"] = round(len(ids) / cpu)
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--limits", action="store_true", help="per-user and per-address buckets on")
    p.add_argument("--proxied", action="store_true", help="clients named in X-Forwarded-For")
    args = p.parse_args()
    global PROXIED
    PROXIED = args.proxied
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
