"""Fair start on the real server: pre-queued orders, the draw the finalizer runs at the start
(ranks, winners, exactly once across crashes and concurrent drawers), and the orders that come
after the start waiting for it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import draws, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult, DrawState, PaymentResult
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer
from gateway.workers.finalizer import Finalizer
from tests.support.state import BOTH_BACKENDS, audit_breaches, snapshot

pytestmark = BOTH_BACKENDS

WINDOW_S = 3600


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of two samples without ties."""
    n = len(xs)
    rx = {x: i for i, x in enumerate(sorted(xs))}
    ry = {y: i for i, y in enumerate(sorted(ys))}
    d2 = sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


class FairStart:
    """A SKU whose sale starts in an hour, pre-queue open now; `start()` moves its start to now
    (a later PUT keeps the draw and its seed), so the draw is due on the server's clock."""

    def __init__(self, redis: Redis, scripts: ScriptRegistry, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.inv = Inventory(redis, scripts, settings)
        self.fin = Finalizer(redis, scripts, settings, name="f1")
        self.fin.claim_every_s = 0.0
        self.starts_at = int(time.time()) + WINDOW_S // 2

    def cfg(self, stock: int, limit: int, starts_at: int) -> SkuConfig:
        return SkuConfig(
            promotion_id="p",
            stock=stock,
            per_user_limit=limit,
            starts_at=starts_at,
            prequeue_s=WINDOW_S,
        )

    async def sku(self, stock: int = 5, limit: int = 5) -> None:
        self.stock, self.limit = stock, limit
        await self.inv.configure_sku("s", self.cfg(stock, limit, self.starts_at))

    async def start(self) -> None:
        """The sale starts: its start moved to a second ago."""
        await self.inv.configure_sku("s", self.cfg(self.stock, self.limit, int(time.time()) - 1))
        self.fin._streams_read_at = -1e9  # its next step reads the SKUs (every second, else)

    async def order(
        self, user: str = "u1", qty: int = 1, *, key: str | None = None, queue_only: bool = False
    ) -> tuple[CreateResult, bytes]:
        req = OrderRequest(user_id=user, sku_id="s", quantity=qty, promotion_id="p")
        return await self.inv.create_order(req, key or str(uuid.uuid4()), queue_only=queue_only)

    async def prequeue(self, n: int, *, queue_only: bool = False) -> list[str]:
        """n pre-queued orders of distinct users, in arrival order."""
        ids = []
        for i in range(n):
            result, body = await self.order(f"u{i}", queue_only=queue_only)
            assert result is CreateResult.CREATED, body
            ids.append(json.loads(body)["order_id"])
        return ids

    async def drain(self) -> int:
        total = 0
        while handled := await self.fin.step(block=False):
            total += handled
        return total

    async def record(self, order_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.order_key(order_id) or "")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def seed(self) -> str:
        seed = await self.redis.hget(keys.SkuKeys("s").sku, "draw_seed")
        assert seed is not None
        return str(seed.decode())


@pytest.fixture
async def fs(redis: Redis, settings: Settings) -> FairStart:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    return FairStart(redis, scripts, settings)


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


async def _decided_once(fs: FairStart, ids: list[str], stock: int) -> None:
    """Every pre-queued order decided exactly once, in rank order, and stock exact."""
    view = await fs.inv.draws.view("s")
    assert view is not None
    assert view.orders == draws.ranked(await fs.seed(), ids)
    assert draws.problems(view, prequeued=set(ids)) == []
    held = 0
    for order_id in view.orders:
        history = json.loads((await fs.record(order_id))["history"])
        assert len(history) == 2, history
        held += history[1]["to"] == "HELD"
    assert held == min(stock, len(ids))
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.held, sku.available) == (held, stock - held)


async def test_a_drawer_that_dies_mid_draw_is_resumed_exactly_once(
    fs: FairStart, settings: Settings
) -> None:
    await fs.sku(stock=30)
    ids = await fs.prequeue(100)
    await fs.start()
    first = Drawer(fs.inv.draws, settings.replace(draw_batch=7))
    assert await first.draw("s", max_batches=3) is DrawState.DRAWING  # then it "dies"
    sku = await fs.inv.get_sku("s")
    assert sku is not None and sku.draw == "drawing"
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "draw_cursor") or 0) == 21
    assert await fs.inv.draws.view("s") is None
    # an order now is not pre-queued (the pre-queue is closed) and takes no stock
    result, body = await fs.order("late")
    assert json.loads(body)["status"] == "QUEUED"
    assert await fs.redis.scard(keys.SkuKeys("s").prequeue) == 100
    second = Drawer(fs.inv.draws, settings.replace(draw_batch=11))
    assert await second.draw("s") is DrawState.DONE
    assert (first.decided, second.decided) == (21, 79)
    assert await second.draw("s") is DrawState.DONE  # done stays done, nothing decided again
    assert second.decided == 79
    await _decided_once(fs, ids, 30)
    await fs.drain()


async def test_two_drawers_at_once_draw_once(fs: FairStart, settings: Settings) -> None:
    await fs.sku(stock=100)
    ids = await fs.prequeue(250)
    await fs.start()
    clients = [create_client(settings) for _ in range(2)]
    try:
        drawers = []
        for client in clients:
            scripts = ScriptRegistry()
            await scripts.load_all(client)
            inv = Inventory(client, scripts, settings)
            drawers.append(Drawer(inv.draws, settings.replace(draw_batch=5)))
        states = await asyncio.gather(*(d.draw("s") for d in drawers))
    finally:
        for client in clients:
            await client.aclose()
    assert states == [DrawState.DONE, DrawState.DONE]
    assert sum(d.decided for d in drawers) == 250
    await _decided_once(fs, ids, 100)
    await fs.drain()


async def test_finalizers_hold_the_stream_until_the_draw(fs: FairStart) -> None:
    """Two finalizers: whichever reads the entries before the draw leaves them pending; after
    the draw each decides what it holds, once."""
    await fs.sku(stock=3)
    early = await fs.prequeue(6)
    other = Finalizer(fs.redis, fs.inv.scripts, fs.settings, name="f2")
    other.claim_every_s = 0.0
    assert await other.step(block=False) == 0
    assert await fs.drain() == 0
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(2)]
    other._streams_read_at = fs.fin._streams_read_at = -1e9  # both see the start now
    handled = await asyncio.gather(other.step(block=False), fs.fin.step(block=False))
    handled_more = await fs.drain() + await other.step(block=False)
    assert sum(handled) + handled_more == 8
    statuses = [(await fs.record(oid))["status"] for oid in early + late]
    assert statuses.count("HELD") == 3 and statuses[6:] == ["REJECTED", "REJECTED"]
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "backlog") or 0) == 0


async def test_a_finalizer_whose_entries_waited_reads_them_once_another_drew(
    fs: FairStart,
) -> None:
    """f2 read the entries before it knew of the draw (left pending) and still takes the start
    to be an hour away (the start was moved earlier); f1 draws; f2 learns the draw is done at
    its next look and decides what it holds at once, not after the claim timeout (30 s)."""
    await fs.sku(stock=4)
    early = await fs.prequeue(3)
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(2)]
    other = Finalizer(fs.redis, fs.inv.scripts, fs.settings, name="f2")
    await other.refresh_streams()
    stream = keys.SkuKeys("s").stream
    other.draws.held.clear()  # it has not seen the draw's state yet
    assert await other.step(block=False) == 0  # read, every entry WAITING, left pending
    pending: Any = await fs.redis.xpending(stream, keys.FINALIZER_GROUP)
    assert pending["pending"] == 5
    other.draws.held[stream] = time.time() + 3600
    assert await other.step(block=False) == 0  # not due in its view: nothing read
    assert await fs.fin.drawer.draw("s") is DrawState.DONE  # f1 draws
    other._streams_read_at = -1e9  # its next look at the SKUs
    assert await other.step(block=False) == 5
    statuses = [(await fs.record(oid))["status"] for oid in early + late]
    assert statuses[:3] == ["HELD"] * 3 and sorted(statuses[3:]) == ["HELD", "REJECTED"]
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "backlog") or 0) == 0


async def test_a_sku_without_orders_is_drawn_at_once(fs: FairStart) -> None:
    await fs.sku()
    await fs.start()
    result, body = await fs.order()
    assert json.loads(body)["status"] == "QUEUED"
    await fs.drain()
    view: Any = await fs.inv.draws.view("s")
    assert view is not None and view.orders == []
    assert (await fs.record(json.loads(body)["order_id"]))["status"] == "HELD"


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
