"""Protection in front of the order script: token bucket, sold-out memo, backpressure, and the
QUEUE_ONLY switch shared through Redis. All against the real server."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.intake.mode import ModeStore, NoticeWatcher
from gateway.intake.soldout import SoldOutMemo
from gateway.settings import DEFAULT_BUSY_MESSAGE, Settings
from gateway.store import keys
from gateway.transport.scripts import ScriptRegistry
from gateway.web.app import create_app
from tests.support.api import ADMIN, Client, MakeClient, create, put_sku
from tests.support.faultproxy import FaultProxy
from tests.support.state import BOTH_BACKENDS, snapshot

SWITCH = "/api/v1/order/switch"


pytestmark = BOTH_BACKENDS


async def evalsha_calls(redis: Redis) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def until(check: Any, within_s: float = 1.0) -> float:
    """Seconds until `await check()` is true; fails after `within_s`."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within_s, "not within the time allowed"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class TestTokenBucket:
    async def test_empty_bucket_is_429_and_leaves_no_trace(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(qps=0.001, burst=3)
        await put_sku(c, stock=100, per_user_limit=100)
        assert [(await create(c)).status_code for _ in range(3)] == [202] * 3
        before = await snapshot(redis)
        r = await create(c)
        assert r.status_code == 429
        assert r.json() == {"error": "rate_limited", "message": DEFAULT_BUSY_MESSAGE}
        # Retry-After comes from the refill: one token at 0.001/s takes 1000 s.
        assert 990 <= int(r.headers["retry-after"]) <= 1000
        assert r.headers["ratelimit"].startswith('"intake";r=0;t=')
        assert "ratelimit-policy" in r.headers
        assert await snapshot(redis) == before

    async def test_reads_are_never_limited(self, make_client: MakeClient) -> None:
        c = await make_client(qps=0.001, burst=1)
        await put_sku(c)
        order_id = (await create(c)).json()["order_id"]
        assert (await create(c)).status_code == 429
        for _ in range(5):
            assert (await c.get(f"/api/v1/order/{order_id}")).status_code == 200
            assert (await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).status_code == 200
            assert (await c.get(SWITCH, headers=ADMIN)).status_code == 200

    async def test_bad_requests_do_not_spend_tokens(self, make_client: MakeClient) -> None:
        c = await make_client(qps=0.001, burst=1)
        await put_sku(c)
        for _ in range(5):
            r = await c.post("/api/v1/order/create", content=b"{", headers={})
            assert r.status_code == 400
        assert (await create(c)).status_code == 202


class TestSoldOutMemo:
    async def test_flood_after_sell_out_costs_no_round_trip(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(soldout_recheck_ms=60_000)
        await put_sku(c, stock=2, per_user_limit=5)
        first_key = str(uuid.uuid4())
        first = await create(c, first_key, user_id="winner")
        assert (await create(c, user_id="other")).status_code == 202
        r = await create(c)  # Redis answers: nothing left, and the memo learns it
        assert (r.status_code, r.json()["error"]) == (409, "sold_out")
        calls = await evalsha_calls(redis)
        answers = await asyncio.gather(*(create(c, user_id=f"late{i}") for i in range(200)))
        assert {(a.status_code, a.json()["error"]) for a in answers} == {(409, "sold_out")}
        assert await evalsha_calls(redis) == calls  # every one refused from memory
        # The shopper whose order was accepted still gets the first answer, byte for byte.
        again = await create(c, first_key, user_id="winner")
        assert again.status_code == 202 and again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        # Another promotion is not this sold-out SKU: the script answers it, as before.
        wrong = await create(c, user_id="late0", promotion_id="promo-other")
        assert (wrong.status_code, wrong.json()["error"]) == (404, "unknown_sku")

    async def test_more_stock_is_sold_again_on_the_notice(self, make_client: MakeClient) -> None:
        c = await make_client(soldout_recheck_ms=60_000)
        other = await make_client(soldout_recheck_ms=60_000)  # another worker
        await put_sku(c, stock=1)
        assert (await create(c)).status_code == 202
        for client in (c, other):
            assert (await create(client, user_id="u2")).status_code == 409
        await put_sku(c, stock=2)  # publishes stock:sku-42

        async def sells() -> bool:
            return (await create(other, user_id="u3")).status_code == 202

        await until(sells)

    async def test_recheck_finds_stock_that_came_back_silently(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(soldout_recheck_ms=200)
        await put_sku(c, stock=1)
        assert (await create(c)).status_code == 202
        assert (await create(c, user_id="u2")).status_code == 409
        # One more unit without a notice (stock and available together: the invariant holds).
        sku = keys.SkuKeys("sku-42").sku
        await redis.hincrby(sku, "stock", 1)
        await redis.hincrby(sku, "available", 1)
        assert (await create(c, user_id="u3")).status_code == 409  # still from memory
        await asyncio.sleep(0.25)
        assert (await create(c, user_id="u3")).status_code == 202

    async def test_partial_availability_is_not_remembered(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(soldout_recheck_ms=60_000)
        await put_sku(c, stock=2, per_user_limit=5)
        r = await create(c, quantity=3)
        assert (r.status_code, r.json()["available"]) == (409, 2)
        assert (await create(c, quantity=2)).status_code == 202

    @pytest.mark.one_server  # kills the pub/sub clients of that one server
    async def test_start_waits_for_the_channel_and_a_lost_channel_clears_the_memo(
        self, redis: Redis
    ) -> None:
        scripts = ScriptRegistry()
        await scripts.load_all(redis)
        memo = SoldOutMemo(60)
        watcher = NoticeWatcher(redis, ModeStore(redis, scripts), memo, refresh_s=0.05)
        await watcher.start()
        try:
            assert watcher.connected  # listening before the first request is served
            memo.sold_out("A", "p", (), 0)
            await asyncio.sleep(0.2)  # nothing the start-up does later may forget it
            assert memo.refuses("A", "p", "k:u")
            await redis.client_kill_filter(_type="pubsub")  # notices may be missed meanwhile

            async def forgotten() -> bool:
                return watcher.connected and not memo.refuses("A", "p", "k:u")

            await until(forgotten, within_s=5)
        finally:
            await watcher.stop()


class TestBackpressure:
    async def test_full_backlog_is_503_and_holds_nothing(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(queue_max=2)
        await put_sku(c, stock=10, per_user_limit=10)
        key = str(uuid.uuid4())
        first = await create(c, key)
        assert (await create(c)).status_code == 202
        before = await snapshot(redis)
        r = await create(c)
        assert r.status_code == 503
        assert r.json() == {
            "error": "queue_full",
            "message": DEFAULT_BUSY_MESSAGE,
            "backlog": 2,
        }
        assert int(r.headers["retry-after"]) >= 1
        assert await snapshot(redis) == before
        assert (await create(c, key)).content == first.content  # replays still pass
        assert await redis.xlen(keys.SkuKeys("sku-42").stream) == 2

    async def test_queue_only_intake_is_bounded_too(self, make_client: MakeClient) -> None:
        c = await make_client(queue_max=1)
        await put_sku(c)
        assert (await c.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)).is_success
        assert (await create(c)).json()["status"] == "QUEUED"
        assert (await create(c)).json()["error"] == "queue_full"


class TestSwitch:
    async def test_needs_the_token_and_a_known_mode(self, client: Client) -> None:
        assert (await client.get(SWITCH)).status_code == 401
        assert (await client.post(SWITCH, params={"mode": "QUEUE_ONLY"})).status_code == 401
        r = await client.post(SWITCH, params={"mode": "PANIC"}, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        r = await client.post(SWITCH, headers=ADMIN)
        assert r.status_code == 400
        assert (await client.get(SWITCH, headers=ADMIN)).json() == {
            "mode": "NORMAL",
            "changed_at": None,
            "history": [],
        }

    async def test_changes_are_recorded_newest_first(self, client: Client) -> None:
        t0 = int(time.time() * 1000)
        r = await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["mode"] == "QUEUE_ONLY" and r.json()["changed_at"] >= t0 - 1000
        # Switching to the mode in force changes and records nothing.
        again = await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
        assert again.json() == r.json()
        await client.post(SWITCH, params={"mode": "NORMAL"}, headers=ADMIN)
        view = (await client.get(SWITCH, headers=ADMIN)).json()
        assert view["mode"] == "NORMAL"
        assert [(h["from"], h["to"]) for h in view["history"]] == [
            ("QUEUE_ONLY", "NORMAL"),
            ("NORMAL", "QUEUE_ONLY"),
        ]
        assert view["history"][0]["at"] == view["changed_at"]

    async def test_queue_only_enqueues_without_touching_stock(
        self, client: Client, redis: Redis
    ) -> None:
        await put_sku(client, stock=1, per_user_limit=1)
        assert (await create(client)).json()["status"] == "HELD"  # now sold out
        await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
        stock_before = await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)
        key = str(uuid.uuid4())
        r = await create(client, key, user_id="u1")  # sold out and over the limit: queued
        assert r.status_code == 202
        body = r.json()
        assert body == {
            "order_id": body["order_id"],
            "status": "QUEUED",
            "sku_id": "sku-42",
            "quantity": 1,
            "position": 2,  # the HELD order is in the stream ahead of it, not yet finalized
        }
        assert (await create(client, key, user_id="u1")).content == r.content
        after = await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)
        assert after.json() == stock_before.json()
        order = (await client.get(f"/api/v1/order/{body['order_id']}")).json()
        assert order["status"] == "QUEUED"
        assert [(h["from"], h["to"]) for h in order["history"]] == [(None, "QUEUED")]
        assert "hold_expires_at" not in order
        entries = await redis.xrange(keys.SkuKeys("sku-42").stream)
        assert entries[-1][1][b"order_id"] == body["order_id"].encode()
        # The format, the key and the SKU's promotion are still checked.
        assert (await create(client, promotion_id="other")).status_code == 404
        assert (await create(client, quantity=0)).status_code == 400

    async def test_every_worker_applies_a_switch_within_a_second(
        self, make_client: MakeClient
    ) -> None:
        workers = [await make_client() for _ in range(3)]
        await put_sku(workers[0])
        # Polling slowed down (after the poll already waiting is over) so that only the
        # published notice can be this fast.
        for w in workers:
            w._transport.app.state.services.watcher.refresh_s = 60  # type: ignore[attr-defined]
        await asyncio.sleep(0.6)
        await workers[0].post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)

        async def all_queue() -> bool:
            answers = [await create(w) for w in workers]
            return all(a.json()["status"] == "QUEUED" for a in answers)

        await until(all_queue)

    async def test_a_lost_notice_is_caught_by_the_refresh(
        self, make_client: MakeClient, redis: Redis
    ) -> None:
        c = await make_client(mode_refresh_ms=100)
        await put_sku(c)
        await redis.hset(keys.MODE, mapping={"mode": "QUEUE_ONLY", "changed_at": 1})

        async def queued() -> bool:
            r = await create(c, user_id=f"u{uuid.uuid4().hex}")
            assert r.status_code == 202, r.text
            return bool(r.json()["status"] == "QUEUED")

        await until(queued)
        ready = (await c.get("/readyz")).json()
        assert ready["mode"] == "QUEUE_ONLY" and ready["pid"] > 0


@pytest.mark.parametrize("mode", ["NORMAL", "QUEUE_ONLY"])
async def test_lost_scripts_are_reloaded_and_the_mode_kept(
    make_client: MakeClient, redis: Redis, mode: str
) -> None:
    c = await make_client()
    await put_sku(c)
    await c.post(SWITCH, params={"mode": mode}, headers=ADMIN)
    await redis.script_flush()  # what a restarted server has: data from its AOF, no scripts
    r = await c.get("/readyz")
    assert r.status_code == 200 and r.json()["mode"] == mode
    assert all(await redis.script_exists(*(s.sha for s in ScriptRegistry().scripts.values())))
    assert (await create(c)).status_code == 202


@pytest.mark.one_server  # a fault proxy in front of that one server
@pytest.mark.parametrize("fault", ["hang", "reset"])
async def test_outage_answers_within_the_deadline_then_recovers(
    redis: Redis, settings: Settings, fault: str
) -> None:
    proxy = FaultProxy(settings.redis_url or "")
    async with proxy as url:
        app = create_app(
            settings.replace(redis_url=url, redis_timeout_ms=300, breaker_min_calls=1000)
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                await put_sku(c, stock=100, per_user_limit=100)
                await c.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
                proxy.mode = fault
                started = time.monotonic()
                answers = await asyncio.gather(*(create(c) for _ in range(20)))
                elapsed = time.monotonic() - started
                assert {(a.status_code, a.json()["error"]) for a in answers} == {
                    (503, "unavailable")
                }
                # Bounded by the 300 ms deadline (a resend at most doubles it), never a hang.
                assert elapsed < 10
                proxy.mode = "pass"
                r = await create(c)
                assert (r.status_code, r.json()["status"]) == (202, "QUEUED")  # mode kept
    assert await redis.hget(keys.SkuKeys("sku-42").sku, "held") == b"0"


async def test_stock_still_moving_does_not_open_the_breaker(make_client: MakeClient) -> None:
    """At the very end of a bucketed sale a shopper may get 503 while stock moves between
    buckets: Redis answered, so those 503s must not open the breaker for every SKU."""
    from gateway.errors import StockMoving
    from gateway.intake.breaker import State

    c = await make_client(breaker_min_calls=3)
    await put_sku(c)
    gw = c._transport.app.state.services  # type: ignore[attr-defined]

    async def moving(*_: object, **__: object) -> tuple[object, bytes]:
        raise StockMoving()

    gw.inventory.create_order = moving
    answers = [await create(c) for _ in range(10)]
    assert {(a.status_code, a.json()["error"]) for a in answers} == {(503, "unavailable")}
    assert all(a.headers["retry-after"] for a in answers)
    assert gw.breaker.state is State.CLOSED
