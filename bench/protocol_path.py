"""CPU per request of the whole server path but the socket: uvicorn's HTTP protocol (the
gateway's `GatewayHttpProtocol`, or uvicorn's own for the bare Starlette endpoint) fed raw
request bytes in process, the app behind it, the real embedded server for Redis. What it
leaves out is what both servers pay alike: the kernel's socket work and the load generator.
Pinned and in process, it is steady enough on a busy machine to decide what pays.

    taskset -c 0 python -m bench.protocol_path --requests 20000 --connections 64

`intake`, `replay` and `soldout` take the order fast path (`gateway/web/fastpath.py`); the
`_asgi` scenarios the same requests through ASGI (FLASHGATE_FAST_PATH=0).

Prints one JSON line per scenario: CPU microseconds per request of this process (Redis's CPU
is not counted), requests per CPU-second, and the ratio to the bare endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from bench.apps import bare_app
from gateway.ops.embedded import EmbeddedServer
from gateway.settings import Settings
from gateway.web.app import create_app, settle_heap
from gateway.web.protocol import GatewayHttpProtocol

TOKEN = "bench"
PATH = b"/api/v1/order/create"


class Transport(asyncio.Transport):
    """A connection's transport that keeps nothing: counts bytes and answers."""

    def __init__(self, statuses: Counter[bytes]) -> None:
        super().__init__()
        self.statuses = statuses
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data[:9] == b"HTTP/1.1 ":
            self.statuses[bytes(data[9:12])] += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 40000)
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class AsgiOnlyProtocol(GatewayHttpProtocol):
    """The gateway's protocol with its order fast path off (FLASHGATE_FAST_PATH=0)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._fast = None


def request(sku: str, user: str, key: str) -> bytes:
    body = b'{"user_id":"%s","sku_id":"%s","quantity":1,"promotion_id":"p"}' % (
        user.encode(),
        sku.encode(),
    )
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"X-Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (PATH, key.encode(), len(body), body)
    )


def fresh(sku: str, n: int) -> list[bytes]:
    """`n` orders of new shoppers, each with a new key."""
    return [request(sku, f"u{uuid.uuid4().hex[:12]}", str(uuid.uuid4())) for _ in range(n)]


async def drive(
    protocol_class: type[HttpToolsProtocol], config: Config, reqs: list[bytes], connections: int
) -> float:
    """CPU seconds of this process for all requests, on `connections` kept-alive connections,
    each sending its next request when the last answer is complete."""
    loop = asyncio.get_running_loop()
    state = ServerState()
    statuses: Counter[bytes] = Counter()
    queue = iter(reqs)
    finished = loop.create_future()
    open_ = connections

    def make() -> None:
        proto = protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
        complete = proto.on_response_complete

        def next_request() -> None:
            nonlocal open_
            raw = next(queue, None)
            if raw is None:
                open_ -= 1
                if not open_ and not finished.done():
                    finished.set_result(None)
                return
            proto.data_received(raw)

        def on_response_complete() -> None:
            complete()
            loop.call_soon(next_request)

        proto.on_response_complete = on_response_complete  # type: ignore[method-assign]
        proto.connection_made(Transport(statuses))
        loop.call_soon(next_request)

    started = time.process_time()
    for _ in range(connections):
        make()
    await finished
    took = time.process_time() - started
    print(f"  {dict(statuses)}", file=sys.stderr)
    return took


async def put_sku(app: Any, sku: str, stock: int) -> None:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as c:
        r = await c.put(
            f"/api/v1/admin/skus/{sku}",
            json={"promotion_id": "p", "stock": stock, "per_user_limit": 1_000_000_000},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code in (200, 201), r.text


def uvicorn_config(app: Any) -> Config:
    config = Config(
        app,
        loop="none",
        http="httptools",
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    config.load()
    return config


async def run(url: str, args: argparse.Namespace) -> None:
    os.environ["FLASHGATE_CLIENT_TIMEOUT_S"] = "10"
    settings = Settings(redis_url=url, admin_token=TOKEN, qps=1e9, burst=1_000_000_000)
    app = create_app(settings)
    n = args.requests
    async with app.router.lifespan_context(app):
        await put_sku(app, "hot", 1_000_000_000)
        await put_sku(app, "gone", 1)
        gw, bare = uvicorn_config(app), uvicorn_config(bare_app())
        settle_heap()  # as `app_from_env` does in a worker: no full collection scans it
        replay_key = str(uuid.uuid4())
        first = request("hot", "r1", replay_key)
        await drive(GatewayHttpProtocol, gw, [first, request("gone", "s0", str(uuid.uuid4()))], 1)
        await drive(GatewayHttpProtocol, gw, [request("gone", "s1", str(uuid.uuid4()))], 1)
        scenarios = {
            "bare": (HttpToolsProtocol, bare, "hot", False),
            "intake": (GatewayHttpProtocol, gw, "hot", False),
            "replay": (GatewayHttpProtocol, gw, "hot", True),
            "soldout": (GatewayHttpProtocol, gw, "gone", False),
            "intake_asgi": (AsgiOnlyProtocol, gw, "hot", False),
            "replay_asgi": (AsgiOnlyProtocol, gw, "hot", True),
            "soldout_asgi": (AsgiOnlyProtocol, gw, "gone", False),
        }
        if args.only:
            scenarios = {k: v for k, v in scenarios.items() if k in args.only or k == "bare"}
        results: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(args.rounds):
            for name, (cls, config, sku, replay) in scenarios.items():
                reqs = (
                    [first] * n
                    if replay
                    else [
                        request(sku, f"u{uuid.uuid4().hex[:12]}", str(uuid.uuid4()))
                        for _ in range(n)
                    ]
                )
                results[name].append(await drive(cls, config, reqs, args.connections) / n * 1e6)
        bare_us = sorted(results["bare"])[len(results["bare"]) // 2]
        for name, runs in results.items():
            us = sorted(runs)[len(runs) // 2]
            row = {
                "scenario": name,
                "cpu_us_per_request": round(us, 2),
                "requests_per_cpu_s": round(1e6 / us),
                "ratio_to_bare": round(bare_us / us, 3),
                "min_us": round(min(runs), 2),
                "runs_us": [round(r, 2) for r in runs],
            }
            print(json.dumps(row), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedServer(d, persist=False)
        server.start()
        try:
            await run(server.url, args)
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="alternations; the median is shown")
    p.add_argument("--only", type=lambda v: v.split(","), help="scenarios besides bare")
    args = p.parse_args()
    print(f"python {sys.version.split()[0]}", file=sys.stderr)
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
