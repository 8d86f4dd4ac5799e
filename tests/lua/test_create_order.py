"""create_order.lua called directly against the real server."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.scripts import ScriptRegistry

pytestmark = pytest.mark.lua

KEY = "0b5a3f6e-8d7c-4e1f-9a2b-3c4d5e6f7a8b"
T0 = 1_800_000_000_000  # injected now, epoch ms


@pytest.fixture
async def inv(redis: Redis, settings: Settings) -> Inventory:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    inventory = Inventory(redis, scripts, settings)
    await inventory.configure_sku(
        "sku-1",
        SkuConfig(
            promotion_id="p",
            stock=5,
            per_user_limit=3,
            starts_at=T0 // 1000,
            ends_at=T0 // 1000 + 3600,
        ),
    )
    return inventory


def req(user: str = "u1", qty: int = 1, sku: str = "sku-1", promo: str = "p") -> OrderRequest:
    return OrderRequest(user_id=user, sku_id=sku, quantity=qty, promotion_id=promo)


async def counters(redis: Redis, sku: str = "sku-1") -> dict[str, int]:
    raw = await redis.hgetall(keys.SkuKeys(sku).sku)
    return {
        k.decode(): int(v)
        for k, v in raw.items()
        if k in (b"stock", b"available", b"held", b"sold")
    }


async def test_created_writes_every_record(inv: Inventory, redis: Redis) -> None:
    result, body = await inv.create_order(req(qty=2), KEY, now_ms=T0)
    assert result is CreateResult.CREATED
    import msgspec

    answer = msgspec.json.decode(body)
    oid = answer["order_id"]
    assert answer == {
        "order_id": oid,
        "status": "HELD",
        "sku_id": "sku-1",
        "quantity": 2,
        "hold_expires_at": T0 + 900_000,
    }
    sk = keys.SkuKeys("sku-1")
    assert await counters(redis) == {"stock": 5, "available": 3, "held": 2, "sold": 0}
    assert await redis.hget(sk.users, "u1") == b"2"
    assert await redis.zscore(sk.holds, oid) == T0 + 900_000
    record = await redis.hgetall(sk.order(oid))
    assert record[b"status"] == b"HELD"
    assert msgspec.json.decode(record[b"history"]) == [{"from": None, "to": "HELD", "at": T0}]
    entries = await redis.xrange(sk.stream)
    assert [e[1] for e in entries] == [{b"order_id": oid.encode(), b"event": b"created"}]
    ttl = await redis.pttl(sk.idempotency("u1", KEY))
    assert 86_000_000 < ttl <= 86_400_000


async def test_replay_returns_first_answer_and_writes_nothing(inv: Inventory, redis: Redis) -> None:
    from tests.support.state import snapshot

    _, first = await inv.create_order(req(), KEY, now_ms=T0)
    before = await snapshot(redis)
    result, again = await inv.create_order(req(), KEY, now_ms=T0 + 5000)
    assert result is CreateResult.REPLAYED
    assert again == first
    assert await snapshot(redis) == before


@pytest.mark.parametrize(
    ("second", "why"),
    [(req(qty=2), "quantity"), (req(promo="q"), "promotion"), (req(sku="sku-2"), "sku")],
)
async def test_same_key_different_request_is_refused(
    inv: Inventory, redis: Redis, second: OrderRequest, why: str
) -> None:
    from tests.support.state import snapshot

    await inv.configure_sku("sku-2", SkuConfig(promotion_id="p", stock=5, per_user_limit=3))
    await inv.create_order(req(), KEY, now_ms=T0)
    before = await snapshot(redis)
    result, _ = await inv.create_order(second, KEY, now_ms=T0)
    assert result is CreateResult.KEY_REUSED, why
    assert await snapshot(redis) == before


async def test_key_is_scoped_to_the_user(inv: Inventory) -> None:
    r1, b1 = await inv.create_order(req(user="u1"), KEY, now_ms=T0)
    r2, b2 = await inv.create_order(req(user="u2"), KEY, now_ms=T0)
    assert (r1, r2) == (CreateResult.CREATED, CreateResult.CREATED)
    assert b1 != b2


@pytest.mark.parametrize(
    ("request_", "now", "expected", "payload"),
    [
        (req(sku="nope"), T0, CreateResult.UNKNOWN_SKU, b""),
        (req(promo="other"), T0, CreateResult.UNKNOWN_SKU, b""),
        (req(), T0 - 1, CreateResult.NOT_ACTIVE, b"not_started"),
        (req(), T0 + 3_600_000, CreateResult.NOT_ACTIVE, b"ended"),
        (req(qty=4), T0, CreateResult.LIMIT_EXCEEDED, b"0"),
        (req(qty=6), T0, CreateResult.SOLD_OUT, b"5"),
    ],
)
async def test_refusals_leave_no_trace(
    inv: Inventory,
    redis: Redis,
    request_: OrderRequest,
    now: int,
    expected: CreateResult,
    payload: bytes,
) -> None:
    from tests.support.state import snapshot

    before = await snapshot(redis)
    result, detail = await inv.create_order(request_, KEY, now_ms=now)
    assert (result, detail) == (expected, payload)
    assert await snapshot(redis) == before
    # a refused request is not remembered: the same key is evaluated afresh
    result, _ = await inv.create_order(req(), KEY, now_ms=T0)
    assert result is CreateResult.CREATED


async def test_limit_counts_what_the_user_already_holds(inv: Inventory) -> None:
    assert (await inv.create_order(req(qty=2), "k1", now_ms=T0))[0] is CreateResult.CREATED
    assert (await inv.create_order(req(qty=2), "k2", now_ms=T0)) == (
        CreateResult.LIMIT_EXCEEDED,
        b"2",
    )
    assert (await inv.create_order(req(qty=1), "k3", now_ms=T0))[0] is CreateResult.CREATED


async def test_sells_exactly_the_stock(inv: Inventory, redis: Redis) -> None:
    results = [(await inv.create_order(req(user=f"u{i}"), f"k{i}", now_ms=T0))[0] for i in range(8)]
    assert results.count(CreateResult.CREATED) == 5
    assert results[5:] == [CreateResult.SOLD_OUT] * 3
    assert await counters(redis) == {"stock": 5, "available": 0, "held": 5, "sold": 0}


async def test_server_clock_is_used_when_no_time_is_given(redis: Redis, settings: Settings) -> None:
    import msgspec

    scripts = ScriptRegistry()
    inv = Inventory(redis, scripts, settings)
    await inv.configure_sku("sku-1", SkuConfig(promotion_id="p", stock=1, per_user_limit=1))
    server_s, server_us = await redis.time()
    result, body = await inv.create_order(req(), KEY)
    assert result is CreateResult.CREATED
    expires = msgspec.json.decode(body)["hold_expires_at"]
    assert abs(expires - (server_s * 1000 + server_us // 1000 + 900_000)) < 5_000


async def test_script_flush_forces_a_reload_and_one_application(
    inv: Inventory, redis: Redis
) -> None:
    await redis.script_flush()
    result, _ = await inv.create_order(req(), KEY, now_ms=T0)
    assert result is CreateResult.CREATED
    assert await counters(redis) == {"stock": 5, "available": 4, "held": 1, "sold": 0}
    assert await redis.xlen(keys.SkuKeys("sku-1").stream) == 1
    await redis.script_flush()
    assert (await inv.create_order(req(), KEY, now_ms=T0))[0] is CreateResult.REPLAYED


async def test_every_key_of_one_call_shares_the_sku_slot(settings: Settings) -> None:
    """Every key but the cross-SKU guard carries the SKU's hash tag."""
    sk = keys.SkuKeys("sku-1")
    oid = keys.new_order_id("sku-1")
    for key in (sk.sku, sk.users, sk.holds, sk.stream, sk.order(oid), sk.idempotency("u", KEY)):
        assert key.startswith("fg:{sku-1}:")
