"""Fair start on the real server: pre-queued orders (answers, replays, limits, refusals), the
draw the finalizer runs at the start (HMAC ranks, winners, arrival order no advantage), and the
orders that come after the start waiting for it."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from typing import Any

import pytest

from gateway.schemas import SkuConfig
from gateway.store import draws, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult, PaymentResult
from tests.support.fairstart import WINDOW_S, FairStart, spearman
from tests.support.state import BOTH_BACKENDS, audit_breaches, snapshot

pytestmark = BOTH_BACKENDS


@pytest.mark.parametrize("queue_only", [False, True])
async def test_prequeued_answer_replay_and_reuse(fs: FairStart, queue_only: bool) -> None:
    await fs.sku()
    key = str(uuid.uuid4())
    result, body = await fs.order(key=key, queue_only=queue_only)
    assert result is CreateResult.CREATED
    answer = json.loads(body)
    assert answer == {
        "order_id": answer["order_id"],
        "status": "QUEUED",
        "sku_id": "s",
        "quantity": 1,
        "position": None,
        "opens_at": fs.starts_at,
    }
    # the same request again: the first answer, byte for byte, in either mode
    assert await fs.order(key=key, queue_only=not queue_only) == (CreateResult.REPLAYED, body)
    assert (await fs.order(key=key, qty=2))[0] is CreateResult.KEY_REUSED
    view = await fs.inv.get_order(answer["order_id"])
    assert view is not None and (view.status, view.opens_at) == ("QUEUED", fs.starts_at)
    sk = keys.SkuKeys("s")
    assert await fs.redis.smembers(sk.prequeue) == {answer["order_id"].encode()}
    assert await fs.redis.hgetall(sk.sku) != {}
    assert int(await fs.redis.hget(sk.sku, "available") or -1) == 5  # no stock taken
    # nothing decides it before the start: the finalizer leaves its entry pending
    assert await fs.drain() == 0
    assert (await fs.record(answer["order_id"]))["status"] == "QUEUED"


async def test_before_the_window_the_sale_is_not_active(fs: FairStart) -> None:
    await fs.inv.configure_sku(
        "s",
        SkuConfig(
            promotion_id="p", stock=5, per_user_limit=1, starts_at=fs.starts_at, prequeue_s=60
        ),
    )
    result, payload = await fs.order()
    assert (result, payload) == (CreateResult.NOT_ACTIVE, b"not_started")
    assert await fs.redis.scard(keys.SkuKeys("s").prequeue) == 0


async def test_the_sku_view_shows_the_commitment_never_the_seed(fs: FairStart) -> None:
    await fs.sku()
    view = await fs.inv.get_sku("s")
    assert view is not None
    seed = await fs.seed()
    assert len(bytes.fromhex(seed)) == 32
    assert view.draw_commitment == hashlib.sha256(bytes.fromhex(seed)).hexdigest()
    assert (view.prequeue_s, view.draw) == (WINDOW_S, "pending")
    assert seed not in json.dumps([getattr(view, f) for f in view.__struct_fields__])
    await fs.prequeue(2)
    await fs.inv.configure_sku("s", fs.cfg(9, 1, fs.starts_at + 60))  # a later change
    again = await fs.inv.get_sku("s")
    assert again is not None and again.draw_commitment == view.draw_commitment
    assert await fs.seed() == seed
    await fs.inv.configure_sku("s", SkuConfig(promotion_id="p", stock=9, per_user_limit=1))
    assert await fs.seed() == seed  # prequeue_s off: the draw and its seed stay
    assert await fs.inv.draws.view("s") is None  # not revealed before the draw


async def test_per_user_limit_inside_the_window(fs: FairStart) -> None:
    await fs.sku(stock=10, limit=2)
    assert (await fs.order("u1"))[0] is CreateResult.CREATED
    assert (await fs.order("u1", queue_only=True))[0] is CreateResult.CREATED
    before = await snapshot(fs.redis)
    assert await fs.order("u1") == (CreateResult.LIMIT_EXCEEDED, b"2")
    assert await snapshot(fs.redis) == before  # a refusal leaves no trace
    assert await fs.order("u1", queue_only=True) == (CreateResult.LIMIT_EXCEEDED, b"2")
    assert await fs.order("u2", qty=3) == (CreateResult.LIMIT_EXCEEDED, b"0")
    assert (await fs.order("u2", qty=2))[0] is CreateResult.CREATED
    assert await fs.redis.hgetall(keys.SkuKeys("s").waiting) == {b"u1": b"2", b"u2": b"2"}
    await fs.start()
    await fs.drain()
    # after the draw the waiting units are held: the limit still counts them
    assert await fs.redis.hgetall(keys.SkuKeys("s").waiting) == {}
    assert await fs.redis.hgetall(keys.SkuKeys("s").users) == {b"u1": b"2", b"u2": b"2"}
    assert (await fs.order("u1"))[0] is CreateResult.LIMIT_EXCEEDED


async def test_the_draw_ranks_by_hmac_and_the_first_stock_win(fs: FairStart) -> None:
    await fs.sku(stock=40)
    ids = await fs.prequeue(120)
    await fs.start()
    await fs.drain()
    view = await fs.inv.draws.view("s")
    assert view is not None
    seed = await fs.seed()
    assert view.seed == seed
    assert view.commitment == hashlib.sha256(bytes.fromhex(seed)).hexdigest()
    expected = sorted(
        ids, key=lambda oid: draws.rank_key(bytes.fromhex(seed), oid)
    )  # recomputed here, independently of the drawer's sort
    assert view.orders == expected
    assert draws.problems(view, prequeued=set(ids)) == []
    for rank, order_id in enumerate(view.orders, 1):
        rec = await fs.record(order_id)
        history = json.loads(rec["history"])
        assert [h["to"] for h in history] == ["QUEUED", "HELD" if rank <= 40 else "REJECTED"]
        assert rec["draw_rank"] == str(rank)
        if rank > 40:
            assert rec["reason"] == "sold_out"
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.available, sku.held, sku.draw) == (0, 40, "done")
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "backlog") or 0) == 0
    rejected = [
        f for _, f in await fs.redis.xrange(keys.SkuKeys("s").events) if f[b"event"] == b"REJECTED"
    ]
    assert len(rejected) == 80


async def test_rank_does_not_follow_arrival(fs: FairStart) -> None:
    await fs.sku(stock=300)
    ids = await fs.prequeue(300)
    await fs.start()
    await fs.drain()
    view = await fs.inv.draws.view("s")
    assert view is not None
    rank = {oid: i for i, oid in enumerate(view.orders)}
    rho = spearman([float(i) for i in range(len(ids))], [float(rank[oid]) for oid in ids])
    # n = 300: rho's standard deviation under independence is 1/sqrt(299), about 0.058
    assert abs(rho) < 0.25, rho
    # and the arrival order itself would have failed this check
    assert spearman([float(i) for i in range(300)], [float(i) for i in range(300)]) == 1.0


@pytest.mark.parametrize("queue_only", [False, True])
async def test_an_order_after_the_start_never_beats_a_prequeued_one(
    fs: FairStart, queue_only: bool
) -> None:
    await fs.sku(stock=5)
    early = await fs.prequeue(8)
    await fs.start()
    # at the start, before the draw: queued in either mode, never held
    late: list[str] = []
    for i in range(4):
        result, body = await fs.order(f"late{i}", queue_only=queue_only)
        assert result is CreateResult.CREATED
        answer = json.loads(body)
        assert answer["status"] == "QUEUED" and "opens_at" not in answer
        late.append(answer["order_id"])
    assert await fs.redis.scard(keys.SkuKeys("s").prequeue) == 8  # not pre-queued
    await fs.drain()
    statuses = {oid: (await fs.record(oid))["status"] for oid in early + late}
    assert sum(statuses[oid] == "HELD" for oid in early) == 5
    assert all(statuses[oid] == "REJECTED" for oid in late)
    # after the draw, NORMAL intake holds again at once
    await fs.inv.configure_sku("s", fs.cfg(7, 5, int(time.time()) - 1))
    result, body = await fs.order("after", queue_only=queue_only)
    assert json.loads(body)["status"] == ("QUEUED" if queue_only else "HELD")


async def test_late_orders_decided_after_the_draw_when_stock_remains(fs: FairStart) -> None:
    await fs.sku(stock=10)
    early = await fs.prequeue(4)
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(3)]
    await fs.drain()
    drawn_at = int(await fs.redis.hget(keys.SkuKeys("s").sku, "drawn_at") or 0)
    for oid in early + late:
        history = json.loads((await fs.record(oid))["history"])
        assert history[-1]["to"] == "HELD"
        if oid in late:
            assert history[-1]["at"] >= drawn_at
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.available, sku.held) == (3, 7)


async def test_a_sku_without_orders_is_drawn_at_once(fs: FairStart) -> None:
    await fs.sku()
    await fs.inv.configure_sku("plain", SkuConfig(promotion_id="p", stock=1, per_user_limit=1))
    assert await fs.redis.smembers(keys.DRAW_REGISTRY) == {b"s"}  # what finalizers watch
    await fs.start()
    result, body = await fs.order()
    assert json.loads(body)["status"] == "QUEUED"
    await fs.drain()
    view: Any = await fs.inv.draws.view("s")
    assert view is not None and view.orders == []
    assert (await fs.record(json.loads(body)["order_id"]))["status"] == "HELD"
    fs.fin._streams_read_at = -1e9
    await fs.fin.step(block=False)
    assert await fs.redis.smembers(keys.DRAW_REGISTRY) == set()  # done: no longer watched


@pytest.mark.corrupts
async def test_the_audit_checks_the_draw_against_the_prequeue(fs: FairStart) -> None:
    await fs.sku(stock=2)
    await fs.prequeue(5)
    await fs.start()
    await fs.drain()
    assert await audit_breaches(fs.redis, fs.settings) == {}
    sk = keys.SkuKeys("s")
    await fs.redis.lpop(sk.draw)  # a ranked order lost from the published ranking
    await fs.redis.hset(sk.waiting, "u9", 1)
    found = (await audit_breaches(fs.redis, fs.settings))["s"]
    assert "draw: cursor 5 != 4 orders ranked" in found
    assert "draw done: 4 orders ranked of 5 pre-queued" in found
    assert "draw done: 1 user(s) still have units waiting" in found


async def test_a_payment_before_the_draw_waits_for_it(fs: FairStart) -> None:
    """Both pre-queued orders paid before the start: the one the draw holds is confirmed, the
    one it rejects (stock 1) needs a refund."""
    await fs.sku(stock=1)
    ids = await fs.prequeue(2)
    for i, order_id in enumerate(ids):
        assert await fs.inv.confirm_payment(order_id, f"pay{i}") is PaymentResult.ACCEPTED
    assert await fs.drain() == 0  # nothing decided before the draw, payments included
    await fs.start()
    await fs.drain()
    view = await fs.inv.draws.view("s")
    assert view is not None
    winner, loser = view.orders
    assert (await fs.record(winner))["status"] == "CONFIRMED"
    assert (await fs.record(loser))["status"] == "REJECTED"
    events = [f for _, f in await fs.redis.xrange(keys.SkuKeys("s").events)]
    refunds = [f for f in events if f.get(b"refund_needed") == b"1"]
    assert [f[b"order_id"].decode() for f in refunds] == [loser]
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.sold, sku.held, sku.available) == (1, 0, 0)


async def test_the_backlog_bound_holds_inside_the_window(fs: FairStart) -> None:
    fs.inv = Inventory(fs.redis, fs.inv.scripts, fs.settings.replace(queue_max=2))
    await fs.sku()
    await fs.prequeue(2)
    before = await snapshot(fs.redis)
    assert await fs.order("u9") == (CreateResult.QUEUE_FULL, b"2")
    assert await snapshot(fs.redis) == before


async def test_the_draw_decides_like_a_model_walking_the_ranking(fs: FairStart) -> None:
    """Quantities 1-3, users with several orders, limit 3: each order is decided in rank order
    with the stock and the user's units left, exactly as a plain walk down the ranking says."""
    rng = random.Random(16)
    await fs.sku(stock=25, limit=3)
    orders: dict[str, tuple[str, int]] = {}  # order id -> (user, quantity)
    waiting: dict[str, int] = {}
    for _ in range(60):
        user, qty = f"u{rng.randrange(20)}", rng.randint(1, 3)
        result, body = await fs.order(user, qty)
        if waiting.get(user, 0) + qty > 3:
            assert result is CreateResult.LIMIT_EXCEEDED
            continue
        assert result is CreateResult.CREATED
        waiting[user] = waiting.get(user, 0) + qty
        orders[json.loads(body)["order_id"]] = (user, qty)
    assert len(orders) >= 30 and sum(waiting.values()) > 25  # more asked for than there is
    await fs.start()
    await fs.drain()
    view = await fs.inv.draws.view("s")
    assert view is not None and view.orders == draws.ranked(view.seed, orders)
    stock, owned, expected = 25, dict.fromkeys(waiting, 0), {}
    for order_id in view.orders:
        user, qty = orders[order_id]
        held = qty <= stock and owned[user] + qty <= 3
        stock -= qty if held else 0
        owned[user] += qty if held else 0
        expected[order_id] = "HELD" if held else "REJECTED"
    assert {oid: (await fs.record(oid))["status"] for oid in orders} == expected
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.available, sku.held) == (stock, 25 - stock)
