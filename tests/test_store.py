"""The client boundary over real sockets: no automatic retry, a deadline, a clean 503."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.errors import BackendUnavailable
from gateway.schemas import OrderRequest
from gateway.settings import Settings
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.connect import create_client, create_script_client
from gateway.transport.scripts import ScriptRegistry
from tests.support.api import ADMIN, MakeClient, create, put_sku
from tests.support.faultproxy import FaultProxy


@pytest.fixture
async def loaded(redis: Redis) -> AsyncIterator[ScriptRegistry]:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    yield scripts


REQ = OrderRequest(user_id="u", sku_id="s", quantity=1, promotion_id="p")
KINDS = pytest.mark.parametrize("kind", ["mux", "pool"])


def inventory_on(url: str, scripts: ScriptRegistry, settings: Settings, kind: str) -> Inventory:
    """An Inventory whose scripts run on the `kind` client path to `url`."""
    s = settings.replace(redis_client=kind)
    return Inventory(create_client(s, url), scripts, s, fast=create_script_client(s, url))


async def close(inv: Inventory) -> None:
    if inv.fast is not None:
        await inv.fast.aclose()  # type: ignore[attr-defined]
    await inv.redis.aclose()


@KINDS
@pytest.mark.parametrize("mode", ["hang", "reset"])
async def test_a_failing_script_call_is_sent_at_most_twice(
    mode: str, kind: str, loaded: ScriptRegistry, redis_url: str
) -> None:
    """The client never retries by itself; the gateway resends once, with the same key."""
    proxy = FaultProxy(redis_url, mode=mode)
    async with proxy as url:
        inv = inventory_on(url, loaded, Settings(redis_timeout_ms=300), kind)
        with pytest.raises(BackendUnavailable):
            await inv.create_order(REQ, str(uuid.uuid4()))
        await close(inv)
    # two sends on two connections: the gateway's one resend, none by the client
    assert proxy.count(b"EVALSHA") == 2, proxy.sent
    assert proxy.connections == 2


@KINDS
async def test_a_lost_answer_is_resolved_by_a_replay(
    kind: str, loaded: ScriptRegistry, redis: Redis, redis_url: str
) -> None:
    """The script ran but its answer came too late: the resend replays it, one hold only."""
    from gateway.schemas import SkuConfig

    settings = Settings(redis_timeout_ms=300)
    await Inventory(redis, loaded, settings).configure_sku(
        "s", SkuConfig(promotion_id="p", stock=5, per_user_limit=5)
    )
    proxy = FaultProxy(redis_url)
    async with proxy as url:
        inv = inventory_on(url, loaded, settings, kind)
        await (inv.fast or inv.redis).execute_command("PING")  # the delay hits the script
        proxy.delay_once_s = 0.6
        key = str(uuid.uuid4())
        result, body = await inv.create_order(REQ, key)
        await close(inv)
    assert result is CreateResult.REPLAYED
    assert proxy.count(b"EVALSHA") == 2
    assert await redis.hget("fg:{s}:sku", "held") == b"1"
    assert await redis.xlen("fg:{s}:stream") == 1
    stored = await redis.get(f"fg:{{s}}:idem:u:{key}")
    fingerprint, order_id, deadline = stored.split(b"\n")
    assert fingerprint == b"s|1|p"
    assert body == (
        b'{"order_id":"%s","status":"HELD","sku_id":"s","quantity":1,"hold_expires_at":%s}'
        % (order_id, deadline)
    )


@KINDS
async def test_http_answer_when_redis_is_gone(
    kind: str, make_client: MakeClient, redis: Redis, settings: Settings
) -> None:
    c = await make_client()
    await put_sku(c)
    proxy = FaultProxy(settings.redis_url or "", mode="reset")
    async with proxy as url:
        from gateway.web.services import Services

        app = c._transport.app  # type: ignore[attr-defined]
        gw: Services = app.state.services
        live = gw.intake.inventory
        gw.intake.inventory = inventory_on(url, live.scripts, settings, kind)
        r = await create(c)
        await close(gw.intake.inventory)
        gw.intake.inventory = live
    assert (r.status_code, r.json()["error"]) == (503, "unavailable")
    assert r.json()["message"] == "活动火爆,请稍后再试"
    assert int(r.headers["retry-after"]) >= 1


async def test_breaker_opens_on_slow_redis_and_closes_after(
    redis: Redis, settings: Settings
) -> None:
    """Through a latency-injecting proxy: slow calls open it, a fast probe closes it."""
    import asyncio

    import httpx

    from gateway.web.app import create_app

    proxy = FaultProxy(settings.redis_url or "")
    async with proxy as url:
        app = create_app(
            settings.replace(
                redis_url=url, breaker_rt_ms=50, breaker_min_calls=3, breaker_open_s=0.5
            )
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                await put_sku(c, stock=100, per_user_limit=100)
                proxy.delay_s = 0.1
                slow = [await create(c) for _ in range(3)]
                assert [r.status_code for r in slow] == [202] * 3  # slow, but answered
                sent = proxy.count(b"EVALSHA")
                shed = await create(c)
                assert (shed.status_code, shed.json()["error"]) == (503, "busy")
                assert shed.headers["retry-after"] == "1"
                assert proxy.count(b"EVALSHA") == sent  # refused without touching Redis
                reads = await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN)
                assert reads.status_code == 200  # reads are never refused by the breaker
                proxy.delay_s = 0.0
                await asyncio.sleep(0.6)
                probe = await create(c)
                assert probe.status_code == 202
                assert (await create(c)).status_code == 202


async def test_readyz_turns_503_when_redis_stops_answering(settings: Settings) -> None:
    import httpx

    from gateway.web.app import create_app

    proxy = FaultProxy(settings.redis_url or "", marker=b"PING")
    async with proxy as url:
        app = create_app(settings.replace(redis_url=url, redis_timeout_ms=300))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                assert (await c.get("/readyz")).status_code == 200
                proxy.mode = "hang"
                r = await c.get("/readyz")
                assert (r.status_code, r.json()["error"]) == (503, "unavailable")
                assert r.headers["retry-after"] == "1"
                assert (await c.get("/healthz")).status_code == 200
                proxy.mode = "pass"
                assert (await c.get("/readyz")).status_code == 200


@KINDS
async def test_refused_connect_is_never_resent(kind: str, loaded: ScriptRegistry) -> None:
    from gateway.ops.embedded import free_port
    from gateway.store.sending import maybe_sent as _maybe_sent

    url = f"redis://127.0.0.1:{free_port()}/0"
    inv = inventory_on(url, loaded, Settings(redis_timeout_ms=300), kind)
    with pytest.raises(BackendUnavailable) as info:
        await inv.create_order(REQ, str(uuid.uuid4()))
    await close(inv)
    assert not _maybe_sent(info.value.__cause__)
