"""Hot-SKU stock buckets (gateway/store/buckets.py) against real servers: one server and the
3-primary cluster. A bucketed SKU must sell out to the last unit, never oversell, and keep
stock == available + held + sold in every bucket and as a whole, transfers in flight too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter

import httpx
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.errors import BackendUnavailable
from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import ConfigureResult, CreateResult, PaymentResult, Taken
from gateway.transport.cluster import SLOTS
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer
from gateway.workers.sweeper import Sweeper
from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.state import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


def test_bucket_tags_spread_over_the_slot_space() -> None:
    for count in (2, 3, 4, 8, 16):
        tags = keys.bucket_tags("hot", count)
        assert tags == keys.bucket_tags("hot", count)  # deterministic: every process agrees
        assert tags[0] == "hot" and len(set(tags)) == count
        assert all(keys.SkuKeys(t).sku_id == "hot" for t in tags)
        base, width = key_slot(b"hot"), SLOTS // count
        for b, tag in enumerate(tags):
            assert (key_slot(tag.encode()) - base - b * width) % SLOTS < width
        order_id = keys.new_order_id(tags[-1])
        assert keys.split_order_id(order_id) == (order_id[:26], tags[-1])


def users_of_bucket(bucket: int, count: int, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if keys.bucket_of(f"u{i}", count) == bucket:
            out.append(f"u{i}")
        i += 1
    return out


async def inventory(redis: Redis, settings: Settings, stock: int, buckets: int = 3) -> Inventory:
    inv = Inventory(redis, ScriptRegistry(), settings)
    cfg = SkuConfig(promotion_id="p", stock=stock, per_user_limit=5, buckets=buckets)
    assert (await inv.configure_sku("hot", cfg))[0] is ConfigureResult.CREATED
    return inv


def order(user: str, qty: int = 1) -> OrderRequest:
    return OrderRequest(user_id=user, sku_id="hot", quantity=qty, promotion_id="p")


async def bucket_figures(redis: Redis, count: int = 3) -> list[tuple[int, int, int, int]]:
    out = []
    for tag in keys.bucket_tags("hot", count):
        raw = await redis.hmget(keys.SkuKeys(tag).sku, "stock", "available", "held", "sold")
        out.append(tuple(int(v or 0) for v in raw))
    return out  # type: ignore[return-value]


async def test_a_stampede_sells_every_unit_once(client: Client, redis: Redis) -> None:
    r = await put_sku(client, "hot", stock=100, per_user_limit=1, buckets=3)
    assert r.status_code == 201 and r.json()["buckets"] == 3

    async def shopper(i: int) -> httpx.Response:
        key = str(uuid.uuid4())
        for _ in range(20):  # a 503 (stock still moving at the very end): the same key again
            r = await create(client, key, sku_id="hot", user_id=f"u{i}")
            if r.status_code != 503:
                break
            await asyncio.sleep(0.05)
        return r

    answers = await asyncio.gather(*(shopper(i) for i in range(400)))
    codes = Counter((a.status_code, a.json().get("error")) for a in answers)
    assert codes == {(202, None): 100, (409, "sold_out"): 300}
    view = (await client.get("/api/v1/admin/skus/hot", headers=ADMIN)).json()
    assert (view["stock"], view["available"], view["held"], view["sold"]) == (100, 0, 100, 0)
    assert [f[1] for f in await bucket_figures(redis)] == [0, 0, 0]
    ids = {a.json()["order_id"] for a in answers if a.status_code == 202}
    assert len(ids) == 100
    in_streams = set()
    for tag in keys.bucket_tags("hot", 3):
        in_streams |= {
            e[1][b"order_id"].decode() for e in await redis.xrange(keys.SkuKeys(tag).stream)
        }
    assert in_streams == ids  # every accepted order is in its bucket's stream


async def test_shoppers_of_one_bucket_get_the_other_buckets_stock(
    redis: Redis, settings: Settings
) -> None:
    """Every shopper maps to bucket 0: its share runs out and stock moves in from the other
    buckets, so nothing is stranded while they are refused."""
    inv = await inventory(redis, settings, stock=30)
    users = users_of_bucket(0, 3, 40)
    results = await asyncio.gather(*(inv.create_order(order(u), str(uuid.uuid4())) for u in users))
    assert Counter(r for r, _ in results) == {CreateResult.CREATED: 30, CreateResult.SOLD_OUT: 10}
    assert [f[1] for f in await bucket_figures(redis)] == [0, 0, 0]
    assert inv.mover.moved == 20
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.held) == (30, 0, 30)


async def test_a_big_order_gathers_units_from_several_buckets(
    redis: Redis, settings: Settings
) -> None:
    inv = await inventory(redis, settings, stock=9)
    result, _ = await inv.create_order(order("u1", qty=5), str(uuid.uuid4()))
    assert result is CreateResult.CREATED
    result, _ = await inv.create_order(order("u2", qty=5), str(uuid.uuid4()))
    assert result is CreateResult.SOLD_OUT  # 4 left in all
    result, _ = await inv.create_order(order("u2", qty=4), str(uuid.uuid4()))
    assert result is CreateResult.CREATED
    view = await inv.get_sku("hot")
    assert view is not None and (view.available, view.held) == (0, 9)


async def test_a_transfer_left_halfway_is_counted_then_completed(
    redis: Redis, settings: Settings
) -> None:
    """The mover died after taking units out of bucket 1: they are in transit (counted as
    available, the audit holds), and the sweeper gives them to bucket 0 exactly once."""
    inv = await inventory(redis, settings, stock=30)
    tags = keys.bucket_tags("hot", 3)
    donor = keys.SkuKeys(tags[1])
    take = calls.take_stock(donor, transfer_id="t1", units=4, to_tag=tags[0], now_ms=None)
    taken = Taken.of(await inv.scripts["take_stock"](redis, *take))
    # what was needed, no more (it received its share once)
    assert taken == Taken(units=4, in_flight=0, received=1)
    view = await inv.get_sku("hot")
    assert view is not None
    assert (view.stock, view.available, view.in_transit) == (30, 30, 4)
    row = await inv.audit_sku("hot")
    assert row is not None and row.breaches() == []
    sweeper = Sweeper(redis, ScriptRegistry(), settings.replace(claim_stale_ms=1))
    await asyncio.sleep(0.01)
    await sweeper.sweep_once()
    await sweeper.sweep_once()  # completing again changes nothing
    assert sweeper.transfers_completed == 1
    assert [f[:2] for f in await bucket_figures(redis)] == [(14, 14), (6, 6), (10, 10)]
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.in_transit) == (30, 30, 0)


async def test_audit_catches_stock_that_appeared(redis: Redis, settings: Settings) -> None:
    inv = await inventory(redis, settings, stock=30)
    tag = keys.bucket_tags("hot", 3)[2]
    await redis.hincrby(keys.SkuKeys(tag).sku, "stock", 1)
    await redis.hincrby(keys.SkuKeys(tag).sku, "available", 1)
    row = await inv.audit_sku("hot")
    assert row is not None
    assert "total stock 30 != buckets' stock 31 + in transit 0" in row.breaches()
    await redis.hincrby(keys.SkuKeys(tag).sku, "stock", -1)
    await redis.hincrby(keys.SkuKeys(tag).sku, "available", -1)


async def test_stock_changes_and_a_fixed_bucket_count(redis: Redis, settings: Settings) -> None:
    inv = await inventory(redis, settings, stock=30)
    users = users_of_bucket(2, 3, 8)
    for u in users:
        assert (await inv.create_order(order(u), str(uuid.uuid4())))[0] is CreateResult.CREATED
    cfg = SkuConfig(promotion_id="p", stock=40, per_user_limit=5, buckets=3)
    assert (await inv.configure_sku("hot", cfg))[0] is ConfigureResult.UPDATED
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.held) == (40, 32, 8)
    lower = SkuConfig(promotion_id="p", stock=9, per_user_limit=5, buckets=3)
    assert (await inv.configure_sku("hot", lower))[0] is ConfigureResult.UPDATED
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.held) == (9, 1, 8)
    too_low = SkuConfig(promotion_id="p", stock=7, per_user_limit=5, buckets=3)
    assert await inv.configure_sku("hot", too_low) == (ConfigureResult.STOCK_BELOW_COMMITTED, 8)
    other = SkuConfig(promotion_id="p", stock=9, per_user_limit=5, buckets=4)
    assert await inv.configure_sku("hot", other) == (ConfigureResult.BUCKETS_FIXED, 3)
    changes = await inv.sku_changes("hot")
    assert changes is not None
    assert [c.after.stock for c in changes] == [9, 40, 30]  # the totals, newest first
    row = await inv.audit_sku("hot")
    assert row is not None and row.breaches() == []


async def test_payment_and_expiry_in_buckets(redis: Redis, settings: Settings) -> None:
    scripts = ScriptRegistry()
    s = settings.replace(finalizer_claim_idle_ms=0)
    inv = await inventory(redis, s, stock=6)
    fin = Finalizer(redis, scripts, s, name="f1")
    sweeper = Sweeper(redis, scripts, s)
    now = int(time.time() * 1000)
    paid, unpaid = users_of_bucket(1, 3, 1)[0], users_of_bucket(2, 3, 1)[0]
    r1, b1 = await inv.create_order(order(paid), str(uuid.uuid4()), now_ms=now)
    r2, b2 = await inv.create_order(order(unpaid), str(uuid.uuid4()), now_ms=now - 900_001)
    assert (r1, r2) == (CreateResult.CREATED, CreateResult.CREATED)
    paid_id, unpaid_id = json.loads(b1)["order_id"], json.loads(b2)["order_id"]
    assert keys.split_order_id(paid_id)[1] == keys.bucket_tags("hot", 3)[1]  # type: ignore[index]
    assert await inv.confirm_payment(paid_id, "pay-1") is PaymentResult.ACCEPTED
    while await fin.step(block=False):
        pass
    assert await sweeper.sweep_once() == 1
    paid_view, unpaid_view = await inv.get_order(paid_id), await inv.get_order(unpaid_id)
    assert paid_view is not None and paid_view.status == "CONFIRMED"
    assert unpaid_view is not None and unpaid_view.status == "EXPIRED"
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.held, view.sold) == (6, 5, 0, 1)


async def test_queue_only_orders_of_one_bucket_get_all_the_stock(
    redis: Redis, settings: Settings
) -> None:
    scripts = ScriptRegistry()
    s = settings.replace(finalizer_claim_idle_ms=0)
    inv = await inventory(redis, s, stock=12)
    fin = Finalizer(redis, scripts, s, name="f1")
    ids = []
    for u in users_of_bucket(1, 3, 15):
        result, body = await inv.create_order(order(u), str(uuid.uuid4()), queue_only=True)
        assert result is CreateResult.CREATED
        ids.append(json.loads(body)["order_id"])
    while await fin.step(block=False):
        pass
    statuses = Counter([(await inv.get_order(i)).status for i in ids])  # type: ignore[union-attr]
    assert statuses == {"HELD": 12, "REJECTED": 3}
    view = await inv.get_sku("hot")
    assert view is not None and (view.available, view.held) == (0, 12)


@pytest.mark.parametrize("buckets", [0, 65])
async def test_bucket_count_out_of_range_is_a_400(client: Client, buckets: int) -> None:
    r = await put_sku(client, "hot", buckets=buckets)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


async def test_a_gateway_that_never_saw_the_layout_learns_it(
    redis: Redis, settings: Settings
) -> None:
    """Another process configured the SKU: this one's first order goes to bucket 0's keys,
    the script answers with the bucket count without a write, and the order goes to the
    shopper's bucket."""
    await inventory(redis, settings, stock=9)
    fresh = Inventory(redis, ScriptRegistry(), settings)
    assert fresh.layouts.known("hot") is None
    user = users_of_bucket(2, 3, 1)[0]
    result, body = await fresh.create_order(order(user), str(uuid.uuid4()))
    assert result is CreateResult.CREATED
    assert keys.split_order_id(json.loads(body)["order_id"])[1] == keys.bucket_tags("hot", 3)[2]  # type: ignore[index]
    assert fresh.layouts.known("hot") == 3
    assert [f[2] for f in await bucket_figures(redis)] == [0, 0, 1]


async def test_two_changes_at_once_apply_one_total(redis: Redis, settings: Settings) -> None:
    """Two PUTs of the same new total at once (a double submit): the difference is taken
    against the stored total inside bucket 0's script, so it is applied once."""
    inv = await inventory(redis, settings, stock=100)
    cfg = SkuConfig(promotion_id="p", stock=120, per_user_limit=5, buckets=3)
    results = await asyncio.gather(inv.configure_sku("hot", cfg), inv.configure_sku("hot", cfg))
    assert [r for r, _ in results] == [ConfigureResult.UPDATED] * 2
    view = await inv.get_sku("hot")
    assert view is not None and (view.stock, view.available, view.in_transit) == (120, 120, 0)
    row = await inv.audit_sku("hot")
    assert row is not None and row.breaches() == []


async def test_a_refused_change_writes_nothing_in_any_bucket(
    redis: Redis, settings: Settings
) -> None:
    inv = await inventory(redis, settings, stock=9)
    for u in ("a", "b", "c", "d", "e", "f", "g", "h", "i"):
        assert (await inv.create_order(order(u), str(uuid.uuid4())))[0] is CreateResult.CREATED
    before = [await redis.hgetall(keys.SkuKeys(t).sku) for t in keys.bucket_tags("hot", 3)]
    lower = SkuConfig(promotion_id="p2", stock=5, per_user_limit=1, buckets=3)
    assert await inv.configure_sku("hot", lower) == (ConfigureResult.STOCK_BELOW_COMMITTED, 9)
    plain = SkuConfig(promotion_id="p2", stock=50, per_user_limit=1)  # buckets 1
    assert await inv.configure_sku("hot", plain) == (ConfigureResult.BUCKETS_FIXED, 3)
    after = [await redis.hgetall(keys.SkuKeys(t).sku) for t in keys.bucket_tags("hot", 3)]
    assert after == before


async def test_creations_that_race_or_fail_never_put_more_stock_in_buckets(
    redis: Redis, settings: Settings
) -> None:
    """Two creations at once with different stock, or a creation retried after it stopped
    halfway: the buckets never hold more than the total the SKU reports, and it sells exactly
    that."""
    inv = Inventory(redis, ScriptRegistry(), settings)
    small = SkuConfig(promotion_id="p", stock=100, per_user_limit=1, buckets=3)
    big = SkuConfig(promotion_id="p", stock=1000, per_user_limit=1, buckets=3)
    await asyncio.gather(inv.configure_sku("hot", big), inv.configure_sku("hot", small))
    row = await inv.audit_sku("hot")
    assert row is not None and row.breaches() == []
    total = row.stock
    assert total in (100, 1000)
    await asyncio.sleep(0)  # spreading done: configure_sku returned
    gate = asyncio.Semaphore(50)  # the cluster client's pool has 64 connections per node

    async def buy(i: int) -> CreateResult:
        key = str(uuid.uuid4())
        async with gate:
            for _ in range(50):  # a 503 (stock still moving at the very end): the same key again
                with contextlib.suppress(BackendUnavailable):
                    return (await inv.create_order(order(f"s{i}"), key))[0]
                await asyncio.sleep(0.01)
        raise AssertionError("no answer but 503 for 50 tries")

    results = await asyncio.gather(*(buy(i) for i in range(total + 50)))
    assert Counter(results) == {
        CreateResult.CREATED: total,
        CreateResult.SOLD_OUT: 50,
    }
    row = await inv.audit_sku("hot")
    assert row is not None and row.breaches() == [] and row.held == total


async def test_a_retry_on_a_process_that_never_saw_the_layout_replays(
    redis: Redis, settings: Settings
) -> None:
    """Two-phase intake: the retry finds the key's claim accepted and may only replay; on a
    process that has not learnt the SKU's buckets it asks bucket 0's keys first, which answer
    with the bucket count (not 409 for ever), and the replay comes from the shopper's bucket."""
    first = Inventory(redis, ScriptRegistry(), settings, two_phase=True)
    cfg = SkuConfig(promotion_id="p", stock=9, per_user_limit=5, buckets=3)
    await first.configure_sku("hot", cfg)
    user, key = users_of_bucket(2, 3, 1)[0], str(uuid.uuid4())
    created = await first.create_order(order(user), key)
    assert created[0] is CreateResult.CREATED
    fresh = Inventory(redis, ScriptRegistry(), settings, two_phase=True)
    assert await fresh.create_order(order(user), key) == (CreateResult.REPLAYED, created[1])
