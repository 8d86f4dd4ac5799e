"""Phase two against the real server: finalizer, payment confirmation, sweeper, and the order
state machine, through the same scripts the processes run."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, figures, keys
from gateway.store.deadletters import replay_dead
from gateway.store.inventory import Inventory
from gateway.store.outcomes import (
    CreateResult,
    PaymentResult,
    Replayed,
    ReplayReply,
    history_problem,
)
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer
from gateway.workers.sweeper import Sweeper
from tests.support.api import ADMIN, MakeClient, create, put_sku
from tests.support.processes import flashgate
from tests.support.state import BOTH_BACKENDS

SECRET = "test-payment-secret"
T0 = 1_800_000_000_000
TTL_MS = 900_000


pytestmark = BOTH_BACKENDS


class Phase2:
    def __init__(self, redis: Redis, scripts: ScriptRegistry, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.inv = Inventory(redis, scripts, settings)
        self.fin = Finalizer(redis, scripts, settings, name="f1")
        self.fin.claim_every_s = 0.0  # these tests drive the steps: every step reclaims
        self.sweeper = Sweeper(redis, scripts, settings)

    async def sku(self, sku: str = "s", stock: int = 5, limit: int = 5) -> None:
        await self.inv.configure_sku(
            sku, SkuConfig(promotion_id="p", stock=stock, per_user_limit=limit)
        )

    async def order(
        self,
        user: str = "u1",
        qty: int = 1,
        sku: str = "s",
        *,
        queue_only: bool = False,
        now_ms: int | None = T0,
    ) -> tuple[CreateResult, dict[str, Any]]:
        req = OrderRequest(user_id=user, sku_id=sku, quantity=qty, promotion_id="p")
        result, body = await self.inv.create_order(
            req, str(uuid.uuid4()), queue_only=queue_only, now_ms=now_ms
        )
        return result, json.loads(body) if result is CreateResult.CREATED else {}

    async def drain(self) -> int:
        total = 0
        while handled := await self.fin.step(block=False):
            total += handled
        return total

    async def status(self, order_id: str) -> str:
        view = await self.inv.get_order(order_id)
        assert view is not None
        return view.status

    async def history(self, order_id: str) -> list[tuple[str | None, str]]:
        view = await self.inv.get_order(order_id)
        assert view is not None
        return [(h["from"], h["to"]) for h in json.loads(bytes(view.history))]

    async def figures(self, sku: str = "s") -> dict[str, int]:
        raw = await self.redis.hgetall(keys.SkuKeys(sku).sku)
        wanted = (b"stock", b"available", b"held", b"sold", b"backlog")
        return {k.decode(): int(v) for k, v in raw.items() if k in wanted}

    async def events(self, sku: str = "s") -> list[dict[str, str]]:
        return [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await self.redis.xrange(keys.SkuKeys(sku).events)
        ]

    async def audit(self, sku: str = "s") -> list[str]:
        row = await self.inv.audit_sku(sku)
        assert row is not None
        return row.breaches()


@pytest.fixture
async def p2(redis: Redis, settings: Settings) -> Phase2:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    return Phase2(redis, scripts, settings.replace(finalizer_claim_idle_ms=0))


async def test_paid_order_is_confirmed_with_its_history(p2: Phase2) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order(qty=2)
    oid = body["order_id"]
    assert (await p2.figures())["backlog"] == 1
    assert await p2.drain() == 1
    assert await p2.status(oid) == "HELD"
    assert (await p2.figures())["backlog"] == 0
    assert await p2.inv.confirm_payment(oid, "pay-1", now_ms=T0 + 1000) is PaymentResult.ACCEPTED
    assert await p2.inv.confirm_payment(oid, "pay-1") is PaymentResult.REPLAYED
    assert await p2.drain() == 1
    assert await p2.status(oid) == "CONFIRMED"
    assert await p2.history(oid) == [(None, "HELD"), ("HELD", "CONFIRMED")]
    assert await p2.figures() == {"stock": 5, "available": 3, "held": 0, "sold": 2, "backlog": 0}
    (event,) = await p2.events()
    assert event["event"] == "CONFIRMED" and event["order_id"] == oid
    assert (event["payment_id"], event["user_id"], event["quantity"]) == ("pay-1", "u1", "2")
    assert await p2.audit() == []


async def test_unpaid_hold_expires_once_and_is_sold_again(p2: Phase2) -> None:
    await p2.sku(stock=1)
    _, body = await p2.order(now_ms=T0)
    oid = body["order_id"]
    assert (await p2.order(user="u2", now_ms=T0 + 1))[0] is CreateResult.SOLD_OUT
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS - 1) == 0
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS) == 1
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS + 5) == 0  # never twice
    assert await p2.status(oid) == "EXPIRED"
    assert await p2.history(oid) == [(None, "HELD"), ("HELD", "EXPIRED")]
    assert [e["event"] for e in await p2.events()] == ["EXPIRED"]
    assert (await p2.order(user="u2", now_ms=T0 + TTL_MS + 10))[0] is CreateResult.CREATED
    await p2.drain()
    assert await p2.audit() == []


async def test_payment_before_the_deadline_beats_the_sweeper(p2: Phase2) -> None:
    await p2.sku(stock=1)
    _, body = await p2.order(now_ms=T0)
    oid = body["order_id"]
    await p2.inv.confirm_payment(oid, "pay-1", now_ms=T0 + TTL_MS - 1)
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS + 10_000) == 0  # finalizer is late
    await p2.drain()
    assert await p2.status(oid) == "CONFIRMED"
    assert (await p2.figures())["sold"] == 1


@pytest.mark.parametrize("swept_first", [True, False])
async def test_payment_at_the_deadline_loses_to_the_expiry(p2: Phase2, swept_first: bool) -> None:
    await p2.sku(stock=1)
    _, body = await p2.order(now_ms=T0)
    oid = body["order_id"]
    await p2.inv.confirm_payment(oid, "pay-1", now_ms=T0 + TTL_MS)
    if swept_first:
        assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS) == 1
    await p2.drain()
    await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS + 1)
    assert await p2.status(oid) == "PAID_AFTER_EXPIRY"
    expected = [(None, "HELD"), ("HELD", "EXPIRED"), ("EXPIRED", "PAID_AFTER_EXPIRY")]
    assert await p2.history(oid) == (
        expected if swept_first else [(None, "HELD"), ("HELD", "PAID_AFTER_EXPIRY")]
    )
    assert await p2.figures() == {"stock": 1, "available": 1, "held": 0, "sold": 0, "backlog": 0}
    refund = (await p2.events())[-1]
    assert (refund["event"], refund["refund_needed"], refund["payment_id"]) == (
        "PAID_AFTER_EXPIRY",
        "1",
        "pay-1",
    )
    assert await p2.audit() == []


async def test_queue_only_orders_get_exactly_the_stock_there_was(p2: Phase2) -> None:
    await p2.sku(stock=3, limit=2)
    bodies = [(await p2.order(user=u, queue_only=True))[1] for u in ("a", "a", "a", "b", "c")]
    assert {b["status"] for b in bodies} == {"QUEUED"}
    assert (await p2.figures())["available"] == 3  # nothing decided at intake
    await p2.drain()
    statuses = [await p2.status(b["order_id"]) for b in bodies]
    assert statuses == ["HELD", "HELD", "REJECTED", "HELD", "REJECTED"]
    reasons = [e["reason"] for e in await p2.events() if e["event"] == "REJECTED"]
    assert reasons == ["limit_exceeded", "sold_out"]
    assert await p2.history(bodies[2]["order_id"]) == [(None, "QUEUED"), ("QUEUED", "REJECTED")]
    view = await p2.inv.get_order(bodies[0]["order_id"])
    assert view is not None and view.hold_expires_at is not None
    assert await p2.figures() == {"stock": 3, "available": 0, "held": 3, "sold": 0, "backlog": 0}
    assert await p2.audit() == []


async def test_payment_of_a_queued_order_decides_it_first(p2: Phase2) -> None:
    await p2.sku(stock=1)
    _, a = await p2.order(user="a", queue_only=True)
    _, b = await p2.order(user="b", queue_only=True)
    # Both pay before any finalizer ran; the paid entries come after the created ones.
    await p2.inv.confirm_payment(a["order_id"], "pay-a")
    await p2.inv.confirm_payment(b["order_id"], "pay-b")
    await p2.drain()
    assert await p2.status(a["order_id"]) == "CONFIRMED"
    assert await p2.status(b["order_id"]) == "REJECTED"
    kinds = [e["event"] for e in await p2.events()]
    assert kinds == ["REJECTED", "CONFIRMED", "refund_needed"]
    assert await p2.audit() == []


async def test_duplicate_deliveries_have_one_effect(p2: Phase2, redis: Redis) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order(queue_only=True)
    oid = body["order_id"]
    await p2.inv.confirm_payment(oid, "pay-1")
    stream = keys.SkuKeys("s").stream
    await p2.fin.refresh_streams()
    entries = await redis.xrange(stream)
    for _ in range(3):  # each entry applied three times, as after lost acknowledgements
        for entry in entries:
            await p2.fin.apply(stream, "s", entry)
    assert await p2.status(oid) == "CONFIRMED"
    assert await p2.figures() == {"stock": 5, "available": 4, "held": 0, "sold": 1, "backlog": 0}
    assert [e["event"] for e in await p2.events()] == ["CONFIRMED"]
    assert await p2.audit() == []


async def test_a_second_payment_is_refunded_not_applied(p2: Phase2) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order()
    oid = body["order_id"]
    await p2.inv.confirm_payment(oid, "pay-1")
    await p2.inv.confirm_payment(oid, "pay-2")
    _, other = await p2.order(user="u2")
    assert await p2.inv.confirm_payment(other["order_id"], "pay-1") is PaymentResult.PAYMENT_REUSED
    await p2.sku("t")
    _, elsewhere = await p2.order(user="u2", sku="t")  # another SKU, another key slot
    reused = await p2.inv.confirm_payment(elsewhere["order_id"], "pay-1")
    assert reused is PaymentResult.PAYMENT_REUSED
    await p2.drain()
    assert await p2.status(oid) == "CONFIRMED"
    assert [(e["event"], e.get("refund_payment_id")) for e in await p2.events()] == [
        ("CONFIRMED", None),
        ("refund_needed", "pay-2"),
    ]
    assert (await p2.figures())["sold"] == 1


@pytest.mark.corrupts
async def test_bad_entries_go_to_the_dead_letter_stream(p2: Phase2, redis: Redis) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order()
    oid = body["order_id"]
    sk = keys.SkuKeys("s")
    await p2.drain()
    await redis.xadd(sk.stream, {"event": "bogus", "order_id": oid})
    await redis.hdel(sk.order(oid), "history")  # a corrupt record: the script refuses it
    await p2.inv.confirm_payment(oid, "pay-1")
    before = await p2.figures()
    p2.fin.max_deliveries = 2
    await p2.fin.step(block=False)  # malformed: dead at once; corrupt: first failure
    assert await redis.xlen(sk.dead) == 1
    await p2.fin.step(block=False)  # reclaimed (idle >= 0 ms), fails again: dead
    dead = await redis.xrange(sk.dead)
    assert [f[b"reason"] for _, f in dead][0] == b"malformed entry"
    assert b"corrupt order record" in dead[1][1][b"reason"]
    assert (await redis.xpending(sk.stream, keys.FINALIZER_GROUP))["pending"] == 0
    assert await p2.figures() == before  # the refused script wrote nothing
    # what `flashgate dead` lists: newest first, with the entry, the order and the reason
    rows = await figures.dead_letters(redis, None, 10)
    assert [(r[0], r[3], r[4]) for r in rows] == [("s", "paid", oid), ("s", "bogus", oid)]
    assert "corrupt order record" in rows[0][6] and rows[1][6] == "malformed entry"
    assert [r[1] for r in rows] == [dead[1][0].decode(), dead[0][0].decode()]
    assert len(await figures.dead_letters(redis, ["s"], 1)) == 1


async def test_trim_drops_acknowledged_entries_only(p2: Phase2, redis: Redis) -> None:
    await p2.sku(stock=100, limit=100)
    stream = keys.SkuKeys("s").stream
    for _ in range(3):
        await p2.order()
    assert await p2.drain() == 3
    for _ in range(5):
        await p2.order()
    # Another finalizer takes two entries and dies before applying them.
    taken = await redis.xreadgroup(keys.FINALIZER_GROUP, "dead", {stream: ">"}, count=2)
    taken_ids = [eid for eid, _ in taken[0][1]]
    p2.fin.claim_idle_ms = 3_600_000  # not reclaimed yet
    assert await p2.drain() == 3
    await p2.fin.trim()  # the first three go; everything from the pending ones stays
    left = [eid for eid, _ in await redis.xrange(stream)]
    assert left[:2] == taken_ids and len(left) == 5
    p2.fin.claim_idle_ms = 0
    assert await p2.drain() == 2
    assert (await p2.figures())["backlog"] == 0
    assert await p2.fin.trim() == 5
    assert await redis.xlen(stream) == 0  # every entry confirmed: the group keeps its place


async def test_trim_keeps_what_another_group_of_the_stream_has_not_confirmed(
    p2: Phase2, redis: Redis
) -> None:
    await p2.sku(stock=100, limit=100)
    stream = keys.SkuKeys("s").stream
    await redis.xgroup_create(stream, "audit-copy", id="0", mkstream=True)  # a reader of its own
    for _ in range(4):
        await p2.order()
    assert await p2.drain() == 4
    assert await p2.fin.trim() == 0  # that group was handed nothing yet
    await redis.xreadgroup("audit-copy", "c", {stream: ">"}, count=2)
    assert await p2.fin.trim() == 0  # both still pending there
    got: Any = await redis.xrange(stream)
    await redis.xack(stream, "audit-copy", got[0][0])
    assert await p2.fin.trim() == 1 and await redis.xlen(stream) == 3


async def test_payment_endpoint(make_client: MakeClient, redis: Redis) -> None:
    c = await make_client(payment_secret=SECRET)
    await put_sku(c)
    oid = (await create(c)).json()["order_id"]

    def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
        sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return {"X-Signature": sig, "Content-Type": "application/json"}

    url = "/api/v1/payment/confirm"
    body = json.dumps({"order_id": oid, "payment_id": "pay-1"}).encode()
    before = await redis.dbsize()
    for headers in ({}, signed(body, "wrong"), {"X-Signature": "zz"}):
        r = await c.post(url, content=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (401, "bad_signature")
    assert await redis.dbsize() == before
    r = await c.post(url, content=body, headers=signed(body))
    assert r.status_code == 202
    assert r.json() == {"order_id": oid, "payment_id": "pay-1", "accepted": True}
    again = await c.post(url, content=body, headers=signed(body))
    assert again.status_code == 202 and again.content == r.content
    missing = json.dumps({"order_id": "a" * 26 + ".sku-42", "payment_id": "p2"}).encode()
    r = await c.post(url, content=missing, headers=signed(missing))
    assert (r.status_code, r.json()["error"]) == (404, "unknown_order")
    for bad in (b"{", b'{"order_id": 1, "payment_id": "x"}', b'{"order_id": "x"}'):
        r = await c.post(url, content=bad, headers=signed(bad))
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    off = await make_client(payment_secret=None)
    r = await off.post(url, content=body, headers=signed(body))
    assert (r.status_code, r.json()["error"]) == (503, "payments_disabled")
    assert (await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()["held"] == 1


async def test_many_payments_racing_their_expiry_have_one_winner_each(
    redis: Redis, settings: Settings
) -> None:
    """Real server time: holds of 1 s, payments and sweeps fired around the deadline."""
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    p2 = Phase2(redis, scripts, settings.replace(hold_ttl_s=1, finalizer_claim_idle_ms=0))
    await p2.sku(stock=60, limit=1)
    orders = [(await p2.order(user=f"u{i}", now_ms=None))[1] for i in range(60)]
    await p2.drain()
    await asyncio.sleep(0.9)

    async def pay(i: int, oid: str) -> None:
        await asyncio.sleep((i % 20) * 0.01)
        await p2.inv.confirm_payment(oid, f"pay-{i}")

    async def sweep() -> None:
        for _ in range(30):
            await p2.sweeper.sweep_once()
            await asyncio.sleep(0.01)

    await asyncio.gather(sweep(), *(pay(i, o["order_id"]) for i, o in enumerate(orders)))
    await p2.drain()
    await p2.sweeper.sweep_once()
    statuses = [await p2.status(o["order_id"]) for o in orders]
    assert set(statuses) <= {"CONFIRMED", "PAID_AFTER_EXPIRY"}
    confirmed = statuses.count("CONFIRMED")
    figures = await p2.figures()
    assert figures == {
        "stock": 60,
        "available": 60 - confirmed,
        "held": 0,
        "sold": confirmed,
        "backlog": 0,
    }
    events = await p2.events()
    final = [e for e in events if e["event"] in ("CONFIRMED", "PAID_AFTER_EXPIRY")]
    assert sorted(e["order_id"] for e in final) == sorted(o["order_id"] for o in orders)
    assert await p2.audit() == []


def steps(*pairs: tuple[str | None, str]) -> bytes:
    return json.dumps([{"from": f, "to": t, "at": i} for i, (f, t) in enumerate(pairs)]).encode()


CREATED = (None, "HELD")


@pytest.mark.parametrize(
    ("status", "history", "paid", "problem"),
    [
        ("HELD", steps(CREATED), False, None),
        ("CONFIRMED", steps(CREATED, ("HELD", "CONFIRMED")), True, None),
        ("CONFIRMED", steps(CREATED, ("HELD", "CONFIRMED")), False, "CONFIRMED without a payment"),
        (
            "REJECTED",
            steps(CREATED, ("HELD", "REJECTED")),
            False,
            "transition HELD -> REJECTED is not allowed",
        ),
        (
            "EXPIRED",
            steps(CREATED, ("QUEUED", "EXPIRED")),
            False,
            "history jumps from HELD to QUEUED",
        ),
        ("HELD", steps((None, "QUEUED")), False, "status HELD but history ends at QUEUED"),
        ("HELD", steps(("HELD", "EXPIRED")), False, "history does not start with the creation"),
        ("HELD", b"nonsense", False, "unreadable history"),
    ],
)
def test_history_rules(status: str, history: bytes, paid: bool, problem: str | None) -> None:
    assert history_problem(status, history, paid) == problem


@pytest.mark.corrupts
async def test_audit_catches_records_that_disagree_with_the_figures(
    p2: Phase2, redis: Redis
) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order(now_ms=T0)
    row = await p2.inv.audit_sku("s", now_ms=T0 + TTL_MS + 6000, slack_ms=6000)
    assert row is not None and row.breaches() == []
    late = await p2.inv.audit_sku("s", now_ms=T0 + TTL_MS + 6001, slack_ms=6000)
    assert late is not None
    assert late.breaches() == ["a hold is 1 ms past its deadline: is a sweeper running?"]
    await p2.inv.confirm_payment(body["order_id"], "pay-1", now_ms=T0 + 10)
    waiting = await p2.inv.audit_sku("s", now_ms=T0 + 6010, slack_ms=6000)
    assert waiting is not None and waiting.breaches() == []
    stuck = await p2.inv.audit_sku("s", now_ms=T0 + 6011, slack_ms=6000)
    assert stuck is not None
    assert [b.split(": ", 1)[1] for b in stuck.breaches()] == [
        "paid in time but not confirmed after 6 s (finalizer down? dead letters?)"
    ]
    await redis.hset(keys.order_key(body["order_id"]) or "", "status", "CONFIRMED")
    broken = await p2.inv.audit_sku("s")
    assert broken is not None
    problems = broken.breaches()
    assert "held 1 != units of HELD orders 0" in problems
    assert "sold 0 != units of CONFIRMED orders 1" in problems
    assert any("CONFIRMED without a payment" in p or "history ends at HELD" in p for p in problems)


@pytest.mark.corrupts
async def test_a_dead_created_entry_leaves_the_backlog(p2: Phase2, redis: Redis) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order(queue_only=True)
    sk = keys.SkuKeys("s")
    await redis.hdel(sk.order(body["order_id"]), "history")  # corrupt before it is decided
    p2.fin.max_deliveries = 1
    await p2.drain()
    assert await redis.xlen(sk.dead) == 1
    figures = await p2.figures()
    assert (figures["backlog"], figures["available"]) == (0, 5)
    assert (await redis.xpending(sk.stream, keys.FINALIZER_GROUP))["pending"] == 0


@pytest.mark.corrupts
async def test_a_corrupt_hold_is_never_released_and_does_not_stop_the_sweep(
    p2: Phase2, redis: Redis
) -> None:
    for sku in ("s", "t"):
        await p2.sku(sku, stock=2)
    _, bad = await p2.order(sku="s", now_ms=T0)
    _, good = await p2.order(sku="t", now_ms=T0)
    await redis.hdel(keys.order_key(bad["order_id"]) or "", "history")
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS) == 1  # only the sound one
    assert await p2.status(good["order_id"]) == "EXPIRED"
    assert await p2.figures("s") == {"stock": 2, "available": 1, "held": 1, "sold": 0, "backlog": 1}
    assert await redis.zcard(keys.SkuKeys("s").holds) == 0  # out of the index, units kept held
    row = await p2.inv.audit_sku("s")
    assert row is not None and "held 1 != units in active holds 0" in row.breaches()


@pytest.mark.corrupts
async def test_a_hold_whose_record_is_missing_stays_indexed(p2: Phase2, redis: Redis) -> None:
    """During a cluster slot migration the sweep may run where a record has not arrived yet:
    a hold without its record is never dropped from the index (its units would be stranded),
    and a full batch of them neither keeps the sweeper looping nor stalls the holds behind."""
    await p2.sku("s", stock=3)
    ids = [(await p2.order(user=f"u{i}", now_ms=T0))[1]["order_id"] for i in range(2)]
    for oid in ids:
        await redis.delete(keys.order_key(oid) or "")
    _, sound = await p2.order(user="u9", now_ms=T0 + 1)  # due too, behind the two
    p2.sweeper.batch = 2
    assert await p2.sweeper.sweep_once(now_ms=T0 + TTL_MS + 1) == 1  # not stalled by them
    assert await p2.status(sound["order_id"]) == "EXPIRED"
    assert await redis.zcard(keys.SkuKeys("s").holds) == 2
    assert await p2.figures("s") == {"stock": 3, "available": 1, "held": 2, "sold": 0, "backlog": 3}


@pytest.mark.corrupts
async def test_a_repaired_dead_entry_put_back_is_decided(p2: Phase2, redis: Redis) -> None:
    await p2.sku(stock=5)
    _, body = await p2.order(queue_only=True)
    key = keys.order_key(body["order_id"]) or ""
    history = await redis.hget(key, "history")
    await redis.hdel(key, "history")
    p2.fin.max_deliveries = 1
    await p2.drain()
    ((_, dead),) = await redis.xrange(keys.SkuKeys("s").dead)
    assert await redis.hget(key, "status") == b"QUEUED"
    await redis.hset(key, "history", history or b"")  # the operator repairs the record
    await redis.xadd(
        keys.SkuKeys("s").stream, {b"event": dead[b"event"], b"order_id": dead[b"order_id"]}
    )
    await p2.drain()
    assert await p2.status(body["order_id"]) == "HELD"
    assert await p2.figures() == {"stock": 5, "available": 4, "held": 1, "sold": 0, "backlog": 0}


@pytest.mark.corrupts
async def test_replayed_dead_letters_are_decided_and_leave_the_dead_stream(
    p2: Phase2, redis: Redis
) -> None:
    """`flashgate finalizer --replay-dead`: after a repair, every dead letter goes back onto its
    order stream once (fields as they were) and out of the dead-letter stream, atomically."""
    await p2.sku(stock=5)
    bodies = [(await p2.order(user=f"u{i}", queue_only=True))[1] for i in range(2)]
    records = [keys.order_key(b["order_id"]) or "" for b in bodies]
    histories = [await redis.hget(r, "history") for r in records]
    for r in records:
        await redis.hdel(r, "history")  # corrupt before they are decided
    p2.fin.max_deliveries = 1
    await p2.drain()
    sk = keys.SkuKeys("s")
    dead = await redis.xrange(sk.dead)
    assert len(dead) == 2
    for r, h in zip(records, histories, strict=True):
        await redis.hset(r, "history", h or b"")  # the operator repairs the records

    done = await replay_dead(redis, p2.inv.scripts, ["s"])
    assert [(sku, dead_id) for sku, dead_id, _ in done] == [("s", d.decode()) for d, _ in dead]
    assert await redis.xlen(sk.dead) == 0
    back = {entry_id.decode(): f for entry_id, f in await redis.xrange(sk.stream)}
    for (_, fields), (_, _, entry_id) in zip(dead, done, strict=True):
        own = {k: v for k, v in fields.items() if k not in (b"entry_id", b"reason")}
        assert back[entry_id] == own  # the entry as it was
    await p2.drain()
    assert [await p2.status(b["order_id"]) for b in bodies] == ["HELD", "HELD"]
    assert await p2.figures() == {"stock": 5, "available": 3, "held": 2, "sold": 0, "backlog": 0}
    assert await replay_dead(redis, p2.inv.scripts, ["s"]) == []  # nothing left to put back
    # a dead letter already put back (by another operator, concurrently) is not put back twice
    script = p2.inv.scripts["replay_dead"]
    gone = ReplayReply.of(await script(redis, *calls.replay_dead(sk, dead_id=dead[0][0])))
    assert gone == (Replayed.NOT_FOUND, "")


@pytest.mark.one_server
@pytest.mark.corrupts
async def test_the_replay_command_puts_dead_letters_back(
    p2: Phase2, redis: Redis, settings: Settings
) -> None:
    await p2.sku(stock=5)
    await redis.xadd(keys.SkuKeys("s").dead, {"entry_id": "1-0", "reason": "r", "event": "x"})
    run = await asyncio.to_thread(
        flashgate, "finalizer", "--replay-dead", "--sku", "s", REDIS_URL=settings.redis_url or ""
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "1 dead letter(s) put back for the finalizers"
    assert await redis.xlen(keys.SkuKeys("s").dead) == 0
    entries = await redis.xrange(keys.SkuKeys("s").stream)
    assert entries[-1][1] == {b"event": b"x"}
