"""The whole order life cycle as a Hypothesis state machine against the real server.

Random sequences of intake (NORMAL and QUEUE_ONLY, idempotent replays, reused keys), mode
switches, payments (duplicates, payment_id reuse, unknown orders), finalizer steps and
redeliveries, clock jumps, sweeps and restocks, through the same scripts and Python classes
the processes run. After every step the server's state is checked twice:

* against the contract alone (`_check_contract`): stock == available + held + sold, no negative
  counter, held/sold == units of HELD/CONFIRMED orders, per-user counts add up (and stay within
  the limit), histories only follow the contract's transitions, nothing CONFIRMED without a
  payment, expiry and payment never both win, every applied payment ends in exactly one sale or
  refund, and `Inventory.audit_sku(...).breaches() == []`;
* against a small reference model (`Model`) that predicts every answer, counter, order record,
  hold deadline, history entry, payment record and outbound event (and that no stream entry is
  left pending or dead-lettered).

Time. create_order, confirm_payment and sweep take the injected clock (`now_ms`), which starts
far in the future of any real server clock (T0, in 2096). finalize.lua reads the server's TIME
because the Python Finalizer passes "" as ARGV[7]. Both are exercised:

* the "drain" and "one step" variants of the `finalize` rule run a real `Finalizer` whose
  finalize script is wrapped (`InjectedNow`) to pass the injected clock instead of "":
  everything then lives on one clock, so a QUEUED order decided HELD gets a deadline the clock
  can reach, be paid before or after, and be swept, exactly like an order held at intake;
* its "server time" variant runs an unmodified `Finalizer` (server TIME). Its decisions are
  stamped with real time, decades before the injected clock, so a hold it decides is already
  past its deadline for every later payment and sweep. The model resolves those timestamps
  from the records and checks them against TIME read just before and after the step.

Sweeps always take the injected clock: on server time nothing would fall due within a run
(deadlines are in 2096, or a real 15 minutes after a server-time decision).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, event, settings, strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from gateway.intake.mode import ModeStore
from gateway.schemas import Mode, OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.audit import AuditRow
from gateway.store.inventory import Inventory
from gateway.store.outcomes import ConfigureResult, CreateResult, PaymentResult
from gateway.transport.connect import create_client
from gateway.transport.scripts import LuaScript, ScriptRegistry
from gateway.workers.finalizer import Finalizer
from gateway.workers.sweeper import Sweeper
from tests.support.state import BOTH_BACKENDS

T = TypeVar("T")

T0 = 4_000_000_000_000  # epoch ms in 2096: far ahead of the server's TIME (see the docstring)
TTL_S = 900
TTL = TTL_S * 1000
SKUS = ("a", "b")
USERS = ("u1", "u2", "u3")
PROMO = "p"
PAYMENT_IDS = ("pay-1", "pay-2")  # a small pool: reuse is frequent
QUEUE_MAX = 4  # small, so `queue_full` happens
FINALIZER_BATCH = 2  # small, so one finalizer step can leave entries for the next
INF = float("inf")

# The contract's transitions, written out here rather than imported: (None, X) is creation.
TRANSITIONS = {
    (None, "HELD"),
    (None, "QUEUED"),
    ("QUEUED", "HELD"),
    ("QUEUED", "REJECTED"),
    ("HELD", "CONFIRMED"),
    ("HELD", "EXPIRED"),
    ("HELD", "PAID_AFTER_EXPIRY"),
    ("EXPIRED", "PAID_AFTER_EXPIRY"),
}


# ---------------------------------------------------------------------------------------------
# The reference model


pytestmark = BOTH_BACKENDS


@dataclass
class MOrder:
    oid: str
    sku: str
    user: str
    qty: int
    status: str
    created_at: int
    # [from, to, at]; at None: stamped with server TIME, resolved right after the step
    history: list[list[Any]]
    deadline: int | None = None  # hold_expires_at
    payment: str | None = None  # payment_id recorded on the order
    paid_at: int | None = None
    paid_in_time: bool | None = None  # None: no payment recorded
    drained: bool = False


@dataclass
class MSku:
    stock: int
    limit: int
    available: int
    held: int = 0
    sold: int = 0
    backlog: int = 0
    users: dict[str, int] = field(default_factory=dict)
    stream: list[tuple[str, str, str]] = field(default_factory=list)  # unprocessed entries
    # outbound events: (event, order_id, status, payment_id, refund_payment_id, reason)
    events: list[tuple[str, str, str, str | None, str | None, str | None]] = field(
        default_factory=list
    )


@dataclass
class MPayment:
    order_id: str
    applied: bool = False


class Model:
    """What the contract (and the documented design: a payment is in time when recorded
    before the deadline) says the server must hold after each operation."""

    def __init__(self) -> None:
        self.skus: dict[str, MSku] = {}
        self.orders: dict[str, MOrder] = {}
        # A payment_id confirms one order (the contract: "applied once"; the gateway's own
        # 409 payment_id_reused: "this payment_id already confirmed another order").
        self.payments: dict[str, MPayment] = {}
        self.idem: dict[tuple[str, str], tuple[str, int, bytes]] = {}  # (user, key) -> first

    # intake ----------------------------------------------------------------------------------

    def create_outcome(
        self, user: str, sku: str, qty: int, key: str, queue_only: bool
    ) -> tuple[CreateResult, bytes | None]:
        first = self.idem.get((user, key))
        if first is not None:
            if first[:2] == (sku, qty):
                return CreateResult.REPLAYED, first[2]
            return CreateResult.KEY_REUSED, None
        s = self.skus.get(sku)
        if s is None:
            return CreateResult.UNKNOWN_SKU, None
        if not queue_only:
            if s.available < qty:
                return CreateResult.SOLD_OUT, str(s.available).encode()
            if s.users.get(user, 0) + qty > s.limit:
                return CreateResult.LIMIT_EXCEEDED, str(s.users.get(user, 0)).encode()
        if s.backlog >= QUEUE_MAX:
            return CreateResult.QUEUE_FULL, str(s.backlog).encode()
        return CreateResult.CREATED, None

    def created(
        self, oid: str, user: str, sku: str, qty: int, key: str, body: bytes, now: int
    ) -> None:
        s = self.skus[sku]
        status = json.loads(body)["status"]
        o = MOrder(oid, sku, user, qty, status, now, [[None, status, now]])
        if status == "HELD":
            self._hold(s, o)
            o.deadline = now + TTL
        self.orders[oid] = o
        self.idem[(user, key)] = (sku, qty, body)
        s.backlog += 1
        s.stream.append(("created", oid, ""))

    # payments --------------------------------------------------------------------------------

    def confirm(self, oid: str, pid: str, now: int) -> PaymentResult:
        seen = self.payments.get(pid)
        if seen is not None:
            return PaymentResult.REPLAYED if seen.order_id == oid else PaymentResult.PAYMENT_REUSED
        o = self.orders.get(oid)
        if o is None:
            return PaymentResult.UNKNOWN_ORDER
        self.payments[pid] = MPayment(oid)
        if o.payment is None and o.status in ("QUEUED", "HELD"):
            o.payment, o.paid_at = pid, now
            o.paid_in_time = o.status == "QUEUED" or (o.deadline is not None and now < o.deadline)
        self.skus[o.sku].stream.append(("paid", oid, pid))
        return PaymentResult.ACCEPTED

    # finalizer -------------------------------------------------------------------------------

    def finalize(self, per_sku: int | None, at: int | None) -> int:
        """Apply up to `per_sku` unprocessed entries of every SKU (None: all)."""
        done = 0
        for s in self.skus.values():
            batch = s.stream[:per_sku]  # [:None] is all of them
            del s.stream[: len(batch)]
            for kind, oid, pid in batch:
                self._apply(s, kind, self.orders[oid], pid, at)
                done += 1
        return done

    def _apply(self, s: MSku, kind: str, o: MOrder, pid: str, at: int | None) -> None:
        if kind == "created":
            if not o.drained:
                if o.status == "QUEUED":
                    self._decide(s, o, at)
                o.drained = True
                s.backlog -= 1
            return
        pay = self.payments[pid]
        assert pay.order_id == o.oid and not pay.applied  # one entry per accepted payment
        pay.applied = True
        if o.status == "QUEUED":
            self._decide(s, o, at)
        mine = o.payment == pid
        if o.status == "HELD" and mine and o.paid_in_time:
            s.held -= o.qty
            s.sold += o.qty
            self._move(o, "CONFIRMED", at)
            self._emit(s, o, "CONFIRMED")
        elif (o.status == "HELD" and mine) or (
            o.status == "EXPIRED" and (mine or o.payment is None)
        ):
            if o.status == "HELD":  # paid after the deadline, before the sweeper came
                self._release(s, o)
            o.payment = pid
            self._move(o, "PAID_AFTER_EXPIRY", at)
            self._emit(s, o, "PAID_AFTER_EXPIRY")
        else:  # rejected, settled, or a second payment of one order: money goes back
            self._emit(s, o, "refund_needed", refund=pid)

    def _decide(self, s: MSku, o: MOrder, at: int | None) -> None:
        reason = None
        if s.available < o.qty:
            reason = "sold_out"
        elif s.users.get(o.user, 0) + o.qty > s.limit:
            reason = "limit_exceeded"
        if reason is not None:
            self._move(o, "REJECTED", at)
            self._emit(s, o, "REJECTED", reason=reason)
            return
        self._hold(s, o)
        o.deadline = None if at is None else at + TTL  # resolved with `at`
        self._move(o, "HELD", at)

    # sweeper ---------------------------------------------------------------------------------

    def sweep(self, now: int) -> int:
        released = 0
        for sku, s in self.skus.items():
            # The sweeper's index order: by deadline, then by order id.
            due = sorted(
                (o.deadline, o.oid)
                for o in self.orders.values()
                if o.sku == sku
                and o.status == "HELD"
                and not o.paid_in_time  # a payment made in time takes the hold out of reach
                and o.deadline is not None
                and o.deadline <= now
            )
            for _, oid in due:
                o = self.orders[oid]
                self._release(s, o)
                self._move(o, "EXPIRED", now)
                self._emit(s, o, "EXPIRED")
                released += 1
        return released

    # operator --------------------------------------------------------------------------------

    def restock(self, sku: str, stock: int) -> tuple[ConfigureResult, int]:
        s = self.skus[sku]
        if stock < s.held + s.sold:
            return ConfigureResult.STOCK_BELOW_COMMITTED, s.held + s.sold
        s.stock, s.available = stock, stock - s.held - s.sold
        return ConfigureResult.UPDATED, 0

    # helpers ---------------------------------------------------------------------------------

    def _hold(self, s: MSku, o: MOrder) -> None:
        s.available -= o.qty
        s.held += o.qty
        s.users[o.user] = s.users.get(o.user, 0) + o.qty

    def _release(self, s: MSku, o: MOrder) -> None:
        s.available += o.qty
        s.held -= o.qty
        s.users[o.user] -= o.qty
        if s.users[o.user] <= 0:
            del s.users[o.user]

    @staticmethod
    def _move(o: MOrder, to: str, at: int | None) -> None:
        event(f"transition {o.status} -> {to}")
        o.history.append([o.status, to, at])
        o.status = to

    @staticmethod
    def _emit(
        s: MSku, o: MOrder, kind: str, *, refund: str | None = None, reason: str | None = None
    ) -> None:
        s.events.append((kind, o.oid, o.status, o.payment, refund, reason))

    def future_deadlines(self, now: int) -> list[int]:
        return sorted(
            {
                o.deadline
                for o in self.orders.values()
                if o.status == "HELD" and o.deadline is not None and o.deadline > now
            }
        )


# ---------------------------------------------------------------------------------------------
# The machine


def _now_ms_at() -> int:
    """Where finalize's builder puts now_ms in ARGV, found with a marker value."""
    marker = -424_242
    _, args = calls.finalize(
        keys.SkuKeys("s"),
        keys.SkuKeys("s").stream,
        group="g",
        entry_id="0-1",
        event="created",
        order_id="o",
        payment_id="",
        hold_ttl_ms=1,
        now_ms=marker,
    )
    return args.index(marker)


class InjectedNow:
    """finalize.lua with the injected clock as its now_ms in place of the Finalizer's "" (the
    server's time)."""

    NOW_MS_AT = _now_ms_at()

    def __init__(self, script: LuaScript, now: Callable[[], int]) -> None:
        self.script = script
        self.now = now

    async def __call__(self, client: Any, ks: Sequence[str], args: Sequence[Any]) -> Any:
        injected = list(args)
        assert injected[self.NOW_MS_AT] == "", "the Finalizer no longer leaves now_ms to Redis"
        injected[self.NOW_MS_AT] = self.now()
        return await self.script(client, ks, injected)


def still() -> float:
    """The finalizers' clock: they join the streams and trim on their first step only; the
    "trim" variant of `finalize` trims on demand. Real time would make runs irreproducible."""
    return 0.0


def pick(items: Sequence[T], n: int) -> T:
    """The n-th of `items`, cyclically: rules draw an integer rather than use `st.data()`, so
    each rule takes one argument and every printed step shows its whole choice. `items` must
    be in a reproducible order (creation order; never sorted by the random order ids), or a
    replayed example would take other steps."""
    return items[n % len(items)]


INDEX = st.integers(0, 63)


class OrderLifecycle(RuleBasedStateMachine):
    # Few rules, each with a few variants: Hypothesis switches random subsets of rules off in
    # each example (swarm testing), so fewer rules keep every operation frequent. Payments get
    # two rules (they start the longest paths: confirmation, expiry races, refunds).

    def __init__(self, url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis | None = None
        try:
            self.settings = Settings(
                redis_url=url,
                redis_timeout_ms=10_000,
                hold_ttl_s=TTL_S,
                queue_max=QUEUE_MAX,
                finalizer_batch=FINALIZER_BATCH,
                sweep_batch=1,  # several sweep calls per SKU when more than one hold is due
            )
            self.redis = create_client(self.settings)
            scripts = ScriptRegistry()
            self.run(self.redis.flushall())
            self.run(scripts.load_all(self.redis))
        except BaseException:
            self.close()
            raise
        self.now = T0
        self.mode = Mode.NORMAL
        self.model = Model()
        self.inv = Inventory(self.redis, scripts, self.settings)
        self.modes = ModeStore(self.redis, scripts)
        self.sweeper = Sweeper(self.redis, scripts, self.settings)
        injected = {**scripts.scripts, "finalize": InjectedNow(scripts["finalize"], self.clock)}
        self.fin = Finalizer(
            self.redis,
            injected,  # type: ignore[arg-type]
            self.settings,
            name="injected-clock",
            clock=still,
        )
        self.fin_server = Finalizer(
            self.redis, scripts, self.settings, name="server-clock", clock=still
        )
        self.keys_used: list[str] = []
        self.accepted: list[tuple[str, str, str, int]] = []  # (user, key, sku, qty) of 202s
        self.key_counter = 0

    def clock(self) -> int:
        return self.now

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def close(self) -> None:
        try:
            if self.redis is not None:
                self.run(self.redis.aclose())
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def teardown(self) -> None:
        self.close()

    # setup -----------------------------------------------------------------------------------

    @initialize(
        stocks=st.tuples(st.integers(2, 6), st.integers(2, 6)),
        limits=st.tuples(st.integers(1, 4), st.integers(2, 4)),
    )
    def configure(self, stocks: tuple[int, int], limits: tuple[int, int]) -> None:
        for sku, stock, limit in zip(SKUS, stocks, limits, strict=True):
            cfg = SkuConfig(promotion_id=PROMO, stock=stock, per_user_limit=limit)
            assert self.run(self.inv.configure_sku(sku, cfg)) == (ConfigureResult.CREATED, 0)
            self.model.skus[sku] = MSku(stock, limit, stock)
        # A finalizer joins every SKU's stream when it starts (creating it if need be).
        self.run(self.fin.refresh_streams())

    # intake ----------------------------------------------------------------------------------

    def new_key(self) -> str:
        self.key_counter += 1
        return str(uuid.UUID(int=self.key_counter, version=4))

    def _create(self, user: str, sku: str, qty: int, key: str) -> None:
        mode = self.run(self.modes.read())
        assert mode is self.mode
        queue_only = mode is Mode.QUEUE_ONLY
        expected, payload = self.model.create_outcome(user, sku, qty, key, queue_only)
        req = OrderRequest(user_id=user, sku_id=sku, quantity=qty, promotion_id=PROMO)
        result, body = self.run(
            self.inv.create_order(req, key, queue_only=queue_only, now_ms=self.now)
        )
        event(f"create {mode.value}: {result.name}")
        assert result is expected, (result, expected, body)
        if key not in self.keys_used:
            self.keys_used.append(key)
        if result is not CreateResult.CREATED:
            if payload is not None:
                assert body == payload
            return
        answer = json.loads(body)
        oid = answer["order_id"]
        assert keys.split_order_id(oid) is not None and oid.endswith("." + sku)
        want = {"order_id": oid, "sku_id": sku, "quantity": qty}
        if queue_only:  # behind every order of the SKU's stream not yet finalized
            want |= {"status": "QUEUED", "position": self.model.skus[sku].backlog + 1}
        else:
            want |= {"status": "HELD", "hold_expires_at": self.now + TTL}
        assert answer == want
        self.model.created(oid, user, sku, qty, key, body, self.now)
        self.accepted.append((user, key, sku, qty))

    @rule(
        req=st.tuples(
            st.sampled_from(USERS), st.sampled_from(SKUS), st.integers(1, 2), st.none() | INDEX
        )
    )
    def create(self, req: tuple[str, str, int, int | None]) -> None:
        """(user, sku, quantity, key): key None is a fresh key, n picks one used before (by
        anyone, accepted or refused)."""
        user, sku, qty, n = req
        key = self.new_key() if n is None or not self.keys_used else pick(self.keys_used, n)
        self._create(user, sku, qty, key)

    @precondition(lambda self: self.accepted)
    @rule(req=st.tuples(INDEX, st.sampled_from(["nothing", "quantity", "sku", "user"])))
    def replay(self, req: tuple[int, str]) -> None:
        """An accepted request again (REPLAYED, byte for byte); its key with another body
        (KEY_REUSED); or another user's request with that key (a request of its own)."""
        n, change = req
        user, key, sku, qty = pick(self.accepted, n)
        if change == "quantity":
            qty = 3 - qty
        elif change == "sku":
            sku = SKUS[1 - SKUS.index(sku)]
        elif change == "user":
            user = USERS[(USERS.index(user) + 1) % len(USERS)]
        self._create(user, sku, qty, key)

    # payments --------------------------------------------------------------------------------

    def open_orders(self) -> list[str]:
        """Orders a payment can still change (QUEUED, HELD, EXPIRED), newest first."""
        return [
            oid
            for oid, o in reversed(self.model.orders.items())
            if o.status in ("QUEUED", "HELD", "EXPIRED")
        ]

    @precondition(lambda self: self.open_orders())
    @rule(req=st.tuples(st.sampled_from(PAYMENT_IDS), INDEX))
    def pay(self, req: tuple[str, int]) -> None:
        """(payment_id, n): the n-th newest open order is paid, with a payment_id from a small
        pool, so second payments and reuse (within a SKU and across SKUs) are frequent."""
        pid, n = req
        self._pay(pick(self.open_orders(), n), pid)

    @precondition(lambda self: self.model.orders)
    @rule(
        req=st.tuples(
            st.sampled_from(["any order", "repeated", "unknown order"]),
            st.sampled_from(PAYMENT_IDS),
            INDEX,
        )
    )
    def pay_odd(self, req: tuple[str, str, int]) -> None:
        """(kind, payment_id, n): the n-th of all orders is paid (settled and rejected ones
        too); the provider sends the n-th accepted confirmation again; or an order that does
        not exist is paid."""
        kind, pid, n = req
        if kind == "repeated" and self.model.payments:
            pid = pick(list(self.model.payments), n)
            self._pay(self.model.payments[pid].order_id, pid)
        elif kind == "unknown order":
            self._pay_unknown_order(pick(SKUS, n), pid)
        else:
            self._pay(pick(list(self.model.orders), n), pid)

    def _pay(self, oid: str, pid: str) -> None:
        before = self.model.payments.get(pid)
        expected = self.model.confirm(oid, pid, self.now)
        result = self.run(self.inv.confirm_payment(oid, pid, now_ms=self.now))
        event(f"pay: {result.name}")
        assert result is expected, (
            f"confirm_payment({oid}, {pid}) answered {result.name}, expected {expected.name}"
            + (f": {pid} already confirmed order {before.order_id}" if before else "")
        )

    def _pay_unknown_order(self, sku: str, pid: str) -> None:
        result = self.run(self.inv.confirm_payment(keys.new_order_id(sku), pid, now_ms=self.now))
        # A payment_id seen before may be refused as reused before the order is looked up.
        allowed = {PaymentResult.UNKNOWN_ORDER}
        if pid in self.model.payments:
            allowed.add(PaymentResult.PAYMENT_REUSED)
        assert result in allowed, result

    # finalizers ------------------------------------------------------------------------------

    @rule(
        req=st.tuples(
            st.sampled_from(["drain", "drain", "one step", "server time", "redeliver", "trim"]),
            INDEX,
        )
    )
    def finalize(self, req: tuple[str, int]) -> None:
        """(how, n): drain every stream, one finalizer step, drain with an unmodified Finalizer
        (server TIME), apply the n-th delivered entry again, or trim the streams."""
        how, n = req
        if how == "drain":
            assert self.run(self._drain(self.fin)) == self.model.finalize(None, self.now)
        elif how == "one step":
            handled = self.run(self.fin.step(block=False))
            assert handled == self.model.finalize(FINALIZER_BATCH, self.now)
        elif how == "server time":
            self._finalize_server_time()
        elif how == "redeliver":
            self._redeliver(n)
        else:
            self.run(self.fin.trim())

    async def _drain(self, fin: Finalizer) -> int:
        total = 0
        while handled := await fin.step(block=False):
            total += handled
        return total

    def _finalize_server_time(self) -> None:
        """An unmodified Finalizer: finalize.lua stamps its decisions with the server's TIME."""
        lo = self.run(self.server_ms())
        handled = self.run(self._drain(self.fin_server))
        hi = self.run(self.server_ms())
        assert handled == self.model.finalize(None, None)
        self.run(self._resolve_server_times(lo, hi))

    async def server_ms(self) -> int:
        assert self.redis is not None
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def _resolve_server_times(self, lo: int, hi: int) -> None:
        """Fill in the model's server-TIME stamps from the records, checking each is within
        [lo, hi] and, for a decided hold, that its deadline is that time plus the TTL."""
        assert self.redis is not None
        for o in self.model.orders.values():
            if all(step[2] is not None for step in o.history):
                continue
            raw = await self.redis.hget(keys.order_key(o.oid) or "", "history")
            actual = json.loads(raw or b"[]")
            assert len(actual) == len(o.history), (o.oid, actual, o.history)
            for step, got in zip(o.history, actual, strict=True):
                if step[2] is None:
                    assert lo <= got["at"] <= hi, (o.oid, got, lo, hi)
                    step[2] = got["at"]
                    if step[:2] == ["QUEUED", "HELD"]:
                        o.deadline = got["at"] + TTL
                        assert o.deadline < self.now  # already due for the injected clock

    def _redeliver(self, n: int) -> None:
        """An entry delivered before comes again (a lost acknowledgement): no effect."""
        candidates = self.run(self._delivered_entries())
        if candidates:
            stream, sku, entry = pick(candidates, n)
            assert self.run(self.fin.apply(stream, sku, entry)) == 1

    async def _delivered_entries(self) -> list[tuple[str, str, Any]]:
        assert self.redis is not None
        out = []
        for sku in SKUS:
            stream = keys.SkuKeys(sku).stream
            for group in await self.redis.xinfo_groups(stream):
                last = group["last-delivered-id"]
                if last not in (b"0-0", "0-0"):
                    out += [(stream, sku, e) for e in await self.redis.xrange(stream, "-", last)]
        return out

    # time, the sweeper and the operator -----------------------------------------------------

    @rule(
        action=st.tuples(st.just("clock moves by"), st.sampled_from([TTL, TTL // 2, 1000, 1]))
        | st.tuples(st.just("clock moves to a deadline"), INDEX, st.sampled_from([-1, 0, 1]))
        | st.tuples(st.just("sweep"), st.integers(1, 2))
    )
    def clock_or_sweeper(self, action: tuple[Any, ...]) -> None:
        """("clock moves by", ms); ("clock moves to a deadline", n, offset): to one millisecond
        around the n-th future hold deadline (the clock never goes back); ("sweep", times): the
        sweeper runs (twice: a hold is never released twice)."""
        if action[0] == "sweep":
            for _ in range(action[1]):
                released = self.run(self.sweeper.sweep_once(now_ms=self.now))
                assert released == self.model.sweep(self.now)
        elif action[0] == "clock moves by":
            self.now += action[1]
        elif deadlines := self.model.future_deadlines(self.now):
            self.now = max(self.now, pick(deadlines, action[1]) + action[2])

    @rule(
        action=st.tuples(st.just("switch"), st.sampled_from(Mode))
        | st.tuples(st.just("restock"), st.sampled_from(SKUS), st.integers(0, 5))
    )
    def operator(self, action: tuple[Any, ...]) -> None:
        """("switch", mode): the intake mode for the next creates (ModeStore, as the gateway
        reads it); ("restock", sku, stock): a new total, refused below held + sold."""
        if action[0] == "switch":
            mode = action[1]
            assert self.run(self.modes.switch(mode)) is (mode is not self.mode)
            self.mode = mode
            return
        _, sku, stock = action
        cfg = SkuConfig(promotion_id=PROMO, stock=stock, per_user_limit=self.model.skus[sku].limit)
        expected = self.model.restock(sku, stock)
        assert self.run(self.inv.configure_sku(sku, cfg)) == expected

    # invariants ------------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        snaps, audits = self.run(self._read_all())
        for sku, snap in snaps.items():
            _check_contract(sku, snap)
            assert audits[sku].breaches() == [], (sku, audits[sku])
            self._check_model(sku, snap)

    async def _read_all(self) -> tuple[dict[str, dict[str, Any]], dict[str, AuditRow]]:
        audits = {}
        for sku in self.model.skus:
            audit = await self.inv.audit_sku(sku)
            assert audit is not None
            audits[sku] = audit
        return await self._snapshots(), audits

    async def _snapshots(self) -> dict[str, dict[str, Any]]:
        """Everything of every SKU, in two round trips (the database holds one small example)."""
        assert self.redis is not None
        names = ("figures", "users", "holds", "events", "dead", "groups", "orders", "pays")
        async with self.redis.pipeline(transaction=True) as pipe:
            for sku in self.model.skus:
                sk = keys.SkuKeys(sku)
                pipe.hgetall(sk.sku)
                pipe.hgetall(sk.users)
                pipe.zrange(sk.holds, 0, -1, withscores=True)
                pipe.xrange(sk.events)
                pipe.xlen(sk.dead)
                pipe.xinfo_groups(sk.stream)
                pipe.keys(f"{sk.orders_prefix}*")
                pipe.keys(f"{sk.tag}:pay:*")
            replies = await pipe.execute()
        n = len(names)
        raw = {
            sku: dict(zip(names, replies[i * n : (i + 1) * n], strict=True))
            for i, sku in enumerate(self.model.skus)
        }
        record_keys = [k for r in raw.values() for k in r["orders"] + r["pays"]]
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in record_keys:
                pipe.hgetall(key)
            records = dict(zip(record_keys, map(_decoded, await pipe.execute()), strict=True))
        return {
            sku: {
                "figures": _decoded(r["figures"]),
                "users": {k: int(v) for k, v in _decoded(r["users"]).items()},
                "holds": {m.decode(): score for m, score in r["holds"]},
                "orders": {
                    f"{k.decode().rpartition(':')[2]}.{sku}": records[k] for k in r["orders"]
                },
                "pays": {k.decode().partition(":pay:")[2]: records[k] for k in r["pays"]},
                "events": [_decoded(fields) for _, fields in r["events"]],
                "dead": r["dead"],
                "pending": sum(int(g["pending"]) for g in r["groups"]),
            }
            for sku, r in raw.items()
        }

    def _check_model(self, sku: str, snap: dict[str, Any]) -> None:
        m = self.model.skus[sku]
        # Every entry a finalizer read was applied and acknowledged; none was refused.
        assert (snap["pending"], snap["dead"]) == (0, 0), (sku, snap["pending"], snap["dead"])
        f = {k: int(snap["figures"].get(k, 0)) for k in ("stock", "available", "held", "sold")}
        f |= {"backlog": int(snap["figures"].get("backlog", 0))}
        assert f == {
            "stock": m.stock,
            "available": m.available,
            "held": m.held,
            "sold": m.sold,
            "backlog": m.backlog,
        }, (sku, f, m)
        assert snap["users"] == m.users, (sku, snap["users"], m.users)
        mine = {oid: o for oid, o in self.model.orders.items() if o.sku == sku}
        assert set(snap["orders"]) == set(mine), (sku, set(snap["orders"]) ^ set(mine))
        # The queue's counters: every order in, every drained one out; a QUEUED order's
        # position is its place among the orders of the stream not yet finalized (FIFO here).
        queue_out = int(snap["figures"].get("queue_out", 0))
        assert int(snap["figures"].get("queue_in", 0)) - queue_out == m.backlog, (sku, snap)
        waiting = [oid for kind, oid, _ in m.stream if kind == "created"]
        for oid, o in mine.items():
            if o.status == "QUEUED":
                position = int(snap["orders"][oid]["queue_seq"]) - queue_out
                assert position == waiting.index(oid) + 1, (sku, oid, position, waiting)
        for oid, o in mine.items():
            _check_order_against_model(o, snap["orders"][oid], snap["holds"].get(oid))
        extra_holds = set(snap["holds"]) - {o.oid for o in mine.values() if o.status == "HELD"}
        assert not extra_holds, (sku, extra_holds)
        events = [
            (
                e["event"],
                e["order_id"],
                e["status"],
                e.get("payment_id"),
                e.get("refund_payment_id"),
                e.get("reason"),
            )
            for e in snap["events"]
        ]
        assert events == m.events, (sku, events, m.events)
        for pid, rec in snap["pays"].items():
            pay = self.model.payments.get(pid)
            assert pay is not None and rec["order_id"] == pay.order_id, (sku, pid, rec)
            assert ("applied" in rec) is pay.applied, (sku, pid, rec)


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _check_order_against_model(o: MOrder, rec: dict[str, str], hold: float | None) -> None:
    got = {
        "status": rec["status"],
        "user_id": rec["user_id"],
        "quantity": int(rec["quantity"]),
        "created_at": int(rec["created_at"]),
        "hold_expires_at": int(rec["hold_expires_at"]) if "hold_expires_at" in rec else None,
        "payment_id": rec.get("payment_id"),
        "paid_at": int(rec["paid_at"]) if "paid_at" in rec else None,
        "paid_in_time": {"1": True, "0": False}.get(rec.get("paid_in_time", "")),
        "history": [[h["from"], h["to"], h["at"]] for h in json.loads(rec["history"])],
    }
    want = {
        "status": o.status,
        "user_id": o.user,
        "quantity": o.qty,
        "created_at": o.created_at,
        "hold_expires_at": o.deadline,
        "payment_id": o.payment,
        "paid_at": o.paid_at,
        "paid_in_time": o.paid_in_time,
        "history": o.history,
    }
    assert got == want, (o.oid, got, want)
    if o.status == "HELD":
        assert hold == (INF if o.paid_in_time else o.deadline), (o.oid, hold)


# ---------------------------------------------------------------------------------------------
# The contract's invariants, from the server's state alone


def _check_contract(sku: str, snap: dict[str, Any]) -> None:
    fig = {k: int(v) for k, v in snap["figures"].items() if k not in ("promotion_id", "drain_rate")}
    stock, available, held, sold = fig["stock"], fig["available"], fig["held"], fig["sold"]
    assert stock == available + held + sold, (sku, fig)
    assert min(available, held, sold, fig.get("backlog", 0)) >= 0, (sku, fig)
    assert all(v > 0 for v in snap["users"].values()), (sku, snap["users"])
    units: dict[str, int] = {}
    per_user: dict[str, int] = {}
    for oid, rec in snap["orders"].items():
        _check_order_record(oid, rec)
        units[rec["status"]] = units.get(rec["status"], 0) + int(rec["quantity"])
        if rec["status"] in ("HELD", "CONFIRMED"):
            per_user[rec["user_id"]] = per_user.get(rec["user_id"], 0) + int(rec["quantity"])
        if rec["status"] == "CONFIRMED":
            pay = snap["pays"].get(rec["payment_id"], {})
            assert pay.get("order_id") == oid and "applied" in pay, (oid, rec, pay)
    assert held == units.get("HELD", 0), (sku, fig, units)
    assert sold == units.get("CONFIRMED", 0), (sku, fig, units)
    assert sum(snap["users"].values()) == held + sold, (sku, snap["users"], fig)
    assert snap["users"] == per_user, (sku, snap["users"], per_user)
    assert all(v <= fig["per_user_limit"] for v in per_user.values()), (sku, per_user, fig)
    _check_payments_settled(sku, snap)


def _check_order_record(oid: str, rec: dict[str, str]) -> None:
    status = rec["status"]
    steps = [(h["from"], h["to"]) for h in json.loads(rec["history"])]
    assert steps and steps[0][0] is None, (oid, steps)
    for (_, prev_to), (frm, _) in zip(steps, steps[1:], strict=False):
        assert frm == prev_to, (oid, steps)
    assert set(steps) <= TRANSITIONS, (oid, steps)
    assert steps[-1][1] == status, (oid, status, steps)
    if status == "CONFIRMED":  # never without a payment, and only one made in time
        assert rec.get("payment_id") and rec.get("paid_in_time") == "1", (oid, rec)
    if rec.get("paid_in_time") == "1":  # expiry and payment never both win
        assert status not in ("EXPIRED", "PAID_AFTER_EXPIRY"), (oid, rec)
        assert ("HELD", "EXPIRED") not in steps, (oid, steps)


def _check_payments_settled(sku: str, snap: dict[str, Any]) -> None:
    """Every applied payment ended in exactly one sale or one refund."""
    outcomes: dict[str, int] = {}
    for e in snap["events"]:
        if e["event"] in ("CONFIRMED", "PAID_AFTER_EXPIRY"):
            pid = e["payment_id"]
        elif e["event"] == "refund_needed":
            pid = e["refund_payment_id"]
        else:
            continue
        outcomes[pid] = outcomes.get(pid, 0) + 1
    applied = {pid for pid, rec in snap["pays"].items() if "applied" in rec}
    assert set(outcomes) == applied and set(outcomes.values()) <= {1}, (sku, outcomes, applied)


SETTINGS = settings(
    max_examples=75,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No explain phase: it traces every line (slow before Python 3.12) and would push a
    # failing run past the 60 s per-test timeout before it could report the shrunk steps.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


SHRINK_S = 20


def test_order_lifecycle_state_machine(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A passing run takes a few seconds; a failing one spends most of its time shrinking, by
    # default for up to 300 s. Cap that (an internal constant; no setting exists) so a failure
    # is reported with the shortest steps found so far, inside the 60 s per-test timeout.
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_S, raising=False)
    run_state_machine_as_test(lambda: OrderLifecycle(redis_url), settings=SETTINGS)
