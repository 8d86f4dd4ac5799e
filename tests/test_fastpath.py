"""The order path answered by the HTTP protocol itself (`gateway/web/fastpath.py`), over real
sockets against the real server: the same bytes as the ASGI path for every answer kind, and
the protocol's protections (pipelining, `Connection: close`, HTTP/1.0, body limit, client
timeout) kept."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.settings import Settings
from gateway.telemetry import metrics
from gateway.web import protocol as http
from gateway.web.app import create_app
from gateway.web.fastpath import FastCycle
from tests.support.api import ADMIN, order_body
from tests.support.transports import Recorded

Serving = Callable[..., Awaitable[int]]  # serving(**setting_overrides) -> port
DATE = (b"date", b"Sun, 06 Dec 2026 05:00:00 GMT")  # uvicorn's default header, kept fixed here
ID = re.compile(rb'"order_id":"[^"]+"|"hold_expires_at":\d+')


@pytest.fixture
async def serving(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Serving]:
    """serving(**overrides) -> the port of the gateway app behind `GatewayHttpProtocol`
    on a real socket in this loop, with a fixed `date` default header."""
    monkeypatch.setenv("FLASHGATE_CLIENT_TIMEOUT_S", "1")
    http.read_timeout_s.cache_clear()
    stack = contextlib.AsyncExitStack()
    loop = asyncio.get_running_loop()

    async def serve(**overrides: Any) -> int:
        app = create_app(settings.replace(**overrides), redis=redis)
        await stack.enter_async_context(app.router.lifespan_context(app))
        config = Config(
            app, lifespan="off", log_level="warning", timeout_keep_alive=30, proxy_headers=False
        )
        config.load()
        assert config.loaded_app is app  # not wrapped: the protocol finds the fast path
        state = ServerState()
        state.default_headers = [DATE]

        def protocol() -> http.GatewayHttpProtocol:
            return http.GatewayHttpProtocol(config=config, server_state=state, app_state={})

        server = await loop.create_server(protocol, "127.0.0.1", 0)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        stack.callback(close_all, state)
        port: int = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            for sku, cfg in SKUS.items():
                r = await c.put(f"/api/v1/admin/skus/{sku}", json=cfg, headers=ADMIN)
                assert r.status_code in (200, 201), r.text
        return port

    yield serve
    await stack.aclose()
    http.read_timeout_s.cache_clear()


def close_all(state: ServerState) -> None:
    for conn in list(state.connections):
        conn.transport.close()


SKUS: dict[str, dict[str, Any]] = {
    "sku-42": {"promotion_id": "promo-1", "stock": 1000, "per_user_limit": 1000},
    "one": {"promotion_id": "promo-1", "stock": 1, "per_user_limit": 1},
    "later": {
        "promotion_id": "promo-1", "stock": 5, "per_user_limit": 5,
        "starts_at": int(time.time()) + 3600,
    },
}  # fmt: skip


def order(
    *, key: str | None = None, body: bytes | None = None, extra: bytes = b"", **fields: Any
) -> bytes:
    """A raw order request (`key=""`: no idempotency key)."""
    if body is None:
        body = json.dumps(order_body(**fields)).encode()
    key = str(uuid.uuid4()) if key is None else key
    head = b"POST /api/v1/order/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if key:
        head += b"X-Idempotency-Key: %s\r\n" % key.encode()
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole response (head and `content-length` body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head + await reader.readexactly(length)


async def exchange(port: int, raw: bytes, answers: int = 1) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return [await read_answer(reader) for _ in range(answers)]
    finally:
        writer.close()
        await writer.wait_closed()


async def head_only(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
        await writer.wait_closed()


async def both(fast: int, asgi: int, raw: bytes) -> tuple[bytes, bytes]:
    (a,) = await exchange(fast, raw)
    (b,) = await exchange(asgi, raw)
    return a, b


@pytest.fixture
async def ports(serving: Serving) -> tuple[int, int]:
    return await serving(), await serving(fast_path=False)


async def test_new_orders_and_replays_are_the_same_bytes(ports: tuple[int, int]) -> None:
    fast, asgi = ports
    taken = metrics._answers.get(("/api/v1/order/create", 202, "created"), 0)
    (a,) = await exchange(fast, order(user_id="new"))
    (b,) = await exchange(asgi, order(user_id="new"))
    assert a.startswith(b"HTTP/1.1 202 Accepted\r\ndate: ")
    assert ID.sub(b"", a) == ID.sub(b"", b) and a != b  # two orders, two ids
    assert metrics._answers[("/api/v1/order/create", 202, "created")] == taken + 2
    for first in (a, b):  # each replayed by both paths: the first answer, byte for byte
        key = uuid.uuid4()
        raw = order(key=str(key), user_id=f"r{key.hex[:8]}")
        (first,) = await exchange(fast if first is a else asgi, raw)
        again = await both(fast, asgi, raw)
        head, _, body = first.partition(b"\r\n\r\n")
        replayed = head + b"\r\nidempotent-replayed: true\r\n\r\n" + body
        assert again == (replayed, replayed)


REFUSED = {
    "malformed JSON": order(body=b'{"user_id": '),
    "not an object": order(body=b"[1, 2]"),
    "unknown field": order(body=json.dumps(order_body(color="red")).encode()),
    "no key": order(key=""),
    "bad key": order(key="not-a-uuid"),
    "quantity 0": order(quantity=0),
    "quantity over the maximum": order(quantity=101),
    "unknown SKU": order(sku_id="nope"),
    "wrong promotion": order(promotion_id="other"),
    "not started": order(sku_id="later"),
    "too large": order(body=b"{" + b" " * 5000 + b"}"),
    "no content-length": b"POST /api/v1/order/create HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET": b"GET /api/v1/order/create HTTP/1.1\r\nHost: x\r\n\r\n",
    "HEAD": b"HEAD /api/v1/order/create HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", REFUSED.values(), ids=REFUSED.keys())
async def test_refusals_are_the_same_bytes(ports: tuple[int, int], raw: bytes) -> None:
    fast, asgi = ports
    if raw.startswith(b"HEAD"):  # a head alone
        a, b = [await head_only(p, raw) for p in ports]
    else:
        a, b = await both(fast, asgi, raw)
    assert a == b
    assert a.split(b" ")[1] in (b"400", b"403", b"404", b"405", b"413")


async def test_stock_and_key_refusals_are_the_same_bytes(ports: tuple[int, int]) -> None:
    fast, asgi = ports
    key = str(uuid.uuid4())
    (held,) = await exchange(fast, order(key=key, sku_id="one", user_id="a"))
    assert held.startswith(b"HTTP/1.1 202 ")
    refusals = {
        b"409": order(sku_id="one", user_id="b"),  # sold out (the script, then the memo)
        b"422": order(key=key, sku_id="one", user_id="a", quantity=2),  # key reused
    }
    for status, raw in refusals.items():
        for _ in range(2):
            a, b = await both(fast, asgi, raw)
            assert a == b and a.split(b" ")[1] == status, a


async def test_limits_are_the_same_bytes(serving: Serving) -> None:
    """Over the instance's bucket and over the user's: 429 with the same headers."""
    ports = [await serving(qps=0.001, burst=1, user_qps=0.001, user_burst=1) for _ in "ab"]
    for port in ports:
        (a,) = await exchange(port, order(user_id="first"))
        assert a.startswith(b"HTTP/1.1 202 ")
    a, b = [(await exchange(p, order(user_id="first")))[0] for p in ports]
    assert a == b and b"client_rate_limited" in a
    a, b = [(await exchange(p, order(user_id="second")))[0] for p in ports]
    assert a == b and b"retry-after: 1000\r\n" in a and b'"rate_limited"' in a


async def test_pipelined_requests_are_answered_in_order(ports: tuple[int, int]) -> None:
    """Orders, a refusal and another route in one write: the answers in request order,
    each order held once."""
    fast, _ = ports
    raw = (
        order(user_id="p1")
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        + order(quantity=0)
        + order(user_id="p2", quantity=2)
    )
    answers = await exchange(fast, raw, 4)
    assert [a.split(b" ")[1] for a in answers] == [b"202", b"200", b"400", b"202"]
    assert b'"quantity":1' in answers[0] and b'"quantity":2' in answers[3]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fast}") as c:
        view = (await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert view["held"] == 3


@pytest.mark.parametrize(
    "ending",
    [
        lambda: order(extra=b"Connection: close\r\n"),
        lambda: order().replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1),
    ],
    ids=["connection close", "HTTP/1.0"],
)
async def test_an_answer_that_ends_the_connection_says_so(
    ports: tuple[int, int], ending: Callable[[], bytes]
) -> None:
    answers = []
    for port in ports:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ending() + order())  # the second request is never answered
        answers.append(await read_answer(reader))
        assert await reader.read() == b""  # then closed
        writer.close()
    a, b = answers
    assert b"\r\nconnection: close\r\n" in a and a.startswith(b"HTTP/1.1 202 ")
    assert ID.sub(b"", a) == ID.sub(b"", b)


async def test_a_trickled_body_gets_408_and_holds_nothing(ports: tuple[int, int]) -> None:
    fast, _ = ports
    raw = order(user_id="slow")
    reader, writer = await asyncio.open_connection("127.0.0.1", fast)
    writer.write(raw[:-5])
    answer = await asyncio.wait_for(read_answer(reader), 5)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    writer.close()
    # the request arriving late is one the server never took: nothing held
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fast}") as c:
        view = (await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert view["held"] == 0


async def test_a_body_in_pieces_is_answered_once_whole(ports: tuple[int, int]) -> None:
    fast, _ = ports
    raw = order(user_id="pieces")
    reader, writer = await asyncio.open_connection("127.0.0.1", fast)
    for i in range(0, len(raw), 40):
        writer.write(raw[i : i + 40])
        await writer.drain()
        await asyncio.sleep(0.01)
    answer = await read_answer(reader)
    assert answer.startswith(b"HTTP/1.1 202 ") and b'"status":"HELD"' in answer
    writer.close()


@pytest.mark.parametrize("fast_path", [True, False])
async def test_an_answer_waits_while_the_client_does_not_read(
    settings: Settings, fast_path: bool
) -> None:
    """With the transport's write buffer over its high-water mark, the answer waits until it
    drains (uvicorn's flow control), on both paths. (A malformed body: refused before any
    Redis work, so the app runs without its lifespan.)"""
    app = create_app(settings.replace(fast_path=fast_path))
    config = Config(app, lifespan="off", proxy_headers=False)
    config.load()
    proto = http.GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Recorded()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.pause_writing()
    proto.data_received(order(body=b"{"))
    assert isinstance(proto.cycle, FastCycle) is fast_path
    for _ in range(20):
        await asyncio.sleep(0)
    assert transport.writes == []
    proto.resume_writing()
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 400 ")
    proto.connection_lost(None)
