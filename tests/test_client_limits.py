"""Per-user and per-client limits on order creation through the app, against the real server
(or the real cluster), and the client address behind trusted proxies: who is limited, the
answer, that a refusal touches nothing in Redis, that proxy headers count only from a trusted
peer (for the limits, the operator audit and the access log)."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.settings import DEFAULT_BUSY_MESSAGE, Settings
from gateway.web.app import create_app
from tests.support.api import ADMIN, order_body, put_sku
from tests.support.state import BOTH_BACKENDS, snapshot

pytestmark = BOTH_BACKENDS
RULES = "/api/v1/admin/rules"
Peer = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def peer(redis: Redis, settings: Settings) -> AsyncIterator[Peer]:
    """peer(address, **settings) -> a client whose requests come from `address`, on one
    started app per settings (apps share nothing but Redis)."""
    stack = contextlib.AsyncExitStack()
    apps: dict[str, Any] = {}

    async def make(address: str, **overrides: Any) -> httpx.AsyncClient:
        key = repr(sorted(overrides.items()))
        if key not in apps:
            app = create_app(settings.replace(**overrides), redis=redis)
            await stack.enter_async_context(app.router.lifespan_context(app))
            apps[key] = app
        transport = httpx.ASGITransport(app=apps[key], client=(address, 40000))
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://flashgate.test")
        )

    yield make
    await stack.aclose()


async def order(c: httpx.AsyncClient, user: str = "u1", **headers: str) -> httpx.Response:
    return await c.post(
        "/api/v1/order/create",
        json=order_body(user_id=user),
        headers={"X-Idempotency-Key": str(uuid.uuid4()), **headers},
    )


async def statuses(c: httpx.AsyncClient, n: int, user: str = "u1", **headers: str) -> list[int]:
    return [(await order(c, user, **headers)).status_code for _ in range(n)]


async def test_a_greedy_user_is_refused_while_the_others_are_served(
    peer: Peer, redis: Redis
) -> None:
    c = await peer("10.0.0.1", user_qps=0.01, user_burst=3)
    await put_sku(c, stock=100, per_user_limit=100)
    assert await statuses(c, 3, "greedy") == [202] * 3
    before = await snapshot(redis)
    r = await order(c, "greedy")
    assert r.status_code == 429
    assert r.json() == {
        "error": "client_rate_limited",
        "message": DEFAULT_BUSY_MESSAGE,
        "limit": "user",
    }
    assert 90 <= int(r.headers["retry-after"]) <= 100  # a token at 0.01/s
    assert await snapshot(redis) == before  # refused before any Redis work
    assert await statuses(c, 3, "honest") == [202] * 3


async def test_a_greedy_address_is_refused_whatever_user_it_names(peer: Peer) -> None:
    greedy = await peer("10.0.0.66", client_qps=0.01, client_burst=4)
    other = await peer("10.0.0.7", client_qps=0.01, client_burst=4)
    await put_sku(greedy, stock=100, per_user_limit=100)
    got = [(await order(greedy, f"u{i}")).status_code for i in range(6)]
    assert got == [202] * 4 + [429] * 2
    r = await order(greedy, "fresh-user")
    assert (r.status_code, r.json()["limit"]) == (429, "client")
    assert await statuses(other, 4, "u0") == [202] * 4  # the same user, another address


async def test_the_limits_follow_a_change_of_the_rules(peer: Peer) -> None:
    c = await peer("10.0.0.1")
    await put_sku(c, stock=100, per_user_limit=100)
    assert await statuses(c, 5) == [202] * 5  # off by default
    r = await c.put(RULES, json={"user_qps": 0.01, "user_burst": 2}, headers=ADMIN)
    assert r.status_code == 200
    assert await statuses(c, 3, "u2") == [202, 202, 429]
    assert (await c.put(RULES, json={"user_qps": 0}, headers=ADMIN)).status_code == 200
    assert await statuses(c, 3, "u2") == [202] * 3


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(peer: Peer) -> None:
    c = await peer("10.0.0.5", client_qps=0.01, client_burst=2, trusted_proxies="10.9.0.0/16")
    await put_sku(c, stock=100, per_user_limit=100)
    assert (await order(c, "a", **{"X-Forwarded-For": "1.1.1.1"})).status_code == 202
    assert (await order(c, "b", Forwarded="for=2.2.2.2")).status_code == 202
    r = await order(c, "c", **{"X-Forwarded-For": "3.3.3.3"})
    assert r.status_code == 429  # all three are the peer 10.0.0.5


async def test_a_trusted_proxy_names_the_client(peer: Peer) -> None:
    proxies = "10.9.0.0/16, 192.0.2.1"
    lb = await peer("10.9.0.1", client_qps=0.01, client_burst=1, trusted_proxies=proxies)
    await put_sku(lb, stock=100, per_user_limit=100)
    # the right-most address that is not a proxy; what the client wrote left of it is ignored
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9, 192.0.2.1"}
    assert (await order(lb, "a", **xff)).status_code == 202
    assert (await order(lb, "b", **{"X-Forwarded-For": "7.7.7.7, 203.0.113.9"})).status_code == 429
    forwarded = {"Forwarded": 'for="[2001:db8::5]:4711";proto=https, for=192.0.2.1'}
    assert (await order(lb, "c", **forwarded)).status_code == 202
    assert (await order(lb, "d", Forwarded="for=2001:db8::5")).status_code == 429
    # malformed where it matters: the header is ignored, the client is the proxy itself
    assert (await order(lb, "e", **{"X-Forwarded-For": "1.2.3.4, bogus"})).status_code == 202
    assert (await order(lb, "f", **{"X-Forwarded-For": "5.6.7.8, "})).status_code == 429


async def test_the_operator_audit_records_the_client_behind_a_trusted_proxy(peer: Peer) -> None:
    lb = await peer("10.9.0.1", trusted_proxies="10.9.0.1")
    direct = await peer("10.0.0.8", trusted_proxies="10.9.0.1")
    via = {**ADMIN, "X-Forwarded-For": "198.51.100.7"}
    assert (await lb.put(RULES, json={"qps": 10}, headers=via)).status_code == 200
    assert (await direct.put(RULES, json={"qps": 11}, headers=via)).status_code == 200
    history = (await lb.get(RULES, headers=ADMIN)).json()["history"]
    assert [h["client"] for h in history] == ["10.0.0.8", "198.51.100.7"]
    r = await lb.post("/api/v1/order/switch?mode=QUEUE_ONLY", headers=via)
    assert r.status_code == 200
    assert r.json()["history"][0]["client"] == "198.51.100.7"


async def test_the_access_log_carries_the_client(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    lb = await peer("10.9.0.1", trusted_proxies="10.9.0.1", access_log=True)
    caplog.set_level(logging.INFO, "flashgate.access")
    await lb.get("/api/v1/order/switch", headers={**ADMIN, "X-Forwarded-For": "198.51.100.9"})
    await order(lb, "u1", **{"X-Forwarded-For": "198.51.100.10"})  # unknown SKU: 404
    lines = [r for r in caplog.records if r.name == "flashgate.access"]
    assert [getattr(r, "client", None) for r in lines] == ["198.51.100.9", "198.51.100.10"]
    assert json.dumps([r.getMessage() for r in lines]).count("client=198.51.100.") == 2
