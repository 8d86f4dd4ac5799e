"""Inventory operations: build KEYS/ARGV for the scripts and map their integer codes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgspec
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    TimeoutError as RedisTimeoutError,
)

from gateway.errors import BackendUnavailable, NotApplied, StockMoving
from gateway.schemas import (
    OrderRequest,
    OrderView,
    SkuChange,
    SkuConfig,
    SkuSettings,
    SkuView,
)
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.buckets import Layouts, Mover, journal
from gateway.transport.cluster import SlotMoving
from gateway.transport.connect import Client
from gateway.transport.durable import acked
from gateway.transport.replies import REDIS_FAILURES, NotSent, call, text
from gateway.transport.scripts import Executor, ScriptRegistry
from gateway.web.operators import DEFAULT_OPERATOR

log = logging.getLogger("flashgate")

CHANGES_KEPT = 1000  # about this many entries of each SKU's change log are kept (XADD MAXLEN ~)
REFILL_TRIES = 16  # a bucketed SKU's refills for one order, each moving at least one unit
FENCED_TOKENS_KEPT = 16  # abandoned claims fenced per (user, key, SKU): recovery is rare


class CreateResult(IntEnum):
    CREATED = 1
    REPLAYED = 2
    UNKNOWN_SKU = -1
    NOT_ACTIVE = -2
    SOLD_OUT = -3
    LIMIT_EXCEEDED = -4
    KEY_REUSED = -5
    QUEUE_FULL = -6
    CLAIM_LOST = -7  # cluster mode: this request's claim was recovered as abandoned
    IN_USE = -8  # cluster mode: another request with this key is in progress
    LAYOUT = -9  # the SKU has another number of stock buckets than the request assumed


class Claim(IntEnum):
    """claim_key.lua's codes (cluster mode's phase one)."""

    CLAIMED = 1
    DONE_SAME = 2
    PENDING_SAME = 3
    STALE = 4
    KEY_REUSED = -5
    IN_USE = -8


class PaymentResult(IntEnum):
    ACCEPTED = 1
    REPLAYED = 2
    UNKNOWN_ORDER = -1
    PAYMENT_REUSED = -2


class ConfigureResult(IntEnum):
    CREATED = 1
    UPDATED = 2
    STOCK_BELOW_COMMITTED = -1
    BUCKETS_FIXED = -2  # the bucket count of an existing SKU cannot change


# The contract's transitions; (None, X) is the creation entry.
TRANSITIONS = frozenset(
    {
        (None, "HELD"),
        (None, "QUEUED"),
        ("QUEUED", "HELD"),
        ("QUEUED", "REJECTED"),
        ("HELD", "CONFIRMED"),
        ("HELD", "EXPIRED"),
        ("HELD", "PAID_AFTER_EXPIRY"),
        ("EXPIRED", "PAID_AFTER_EXPIRY"),
    }
)


def history_problem(status: str, history: bytes, paid: bool) -> str | None:
    """What is wrong with one order's history (None: it follows the contract)."""
    try:
        steps = [(h["from"], h["to"]) for h in msgspec.json.decode(history)]
    except (msgspec.DecodeError, KeyError, TypeError):
        return "unreadable history"
    if not steps or steps[0][0] is not None:
        return "history does not start with the creation"
    for (_, prev_to), (frm, _) in zip(steps, steps[1:], strict=False):
        if frm != prev_to:
            return f"history jumps from {prev_to} to {frm}"
    bad = [step for step in steps if step not in TRANSITIONS]
    if bad:
        return f"transition {bad[0][0]} -> {bad[0][1]} is not allowed"
    if steps[-1][1] != status:
        return f"status {status} but history ends at {steps[-1][1]}"
    if status == "CONFIRMED" and not paid:
        return "CONFIRMED without a payment"
    return None


@dataclass(frozen=True, slots=True)
class AuditRow:
    sku_id: str
    stock: int
    available: int
    held: int
    sold: int
    users_total: int
    holds_count: int
    holds_units: int
    holds_not_held: int
    earliest_deadline_ms: int  # 0: no hold with a deadline
    backlog: int
    orders: dict[str, tuple[int, int]] = field(default_factory=dict)  # status -> (count, units)
    order_problems: list[str] = field(default_factory=list)
    overdue_ms: int = 0  # how far the earliest deadline is past the allowed slack

    def breaches(self) -> list[str]:
        """Every broken invariant of this SKU, in words (empty when all hold)."""
        out: list[str] = []
        if self.stock != self.available + self.held + self.sold:
            out.append("stock != available + held + sold")
        if min(self.available, self.held, self.sold, self.backlog) < 0:
            out.append("negative counter")
        if self.holds_units != self.held:
            out.append(f"held {self.held} != units in active holds {self.holds_units}")
        if self.holds_not_held:
            out.append(f"{self.holds_not_held} hold(s) indexed for orders not HELD")
        if self.users_total != self.held + self.sold:
            out.append(f"per-user counts {self.users_total} != held + sold")
        held_units = self.orders.get("HELD", (0, 0))[1]
        sold_units = self.orders.get("CONFIRMED", (0, 0))[1]
        if held_units != self.held:
            out.append(f"held {self.held} != units of HELD orders {held_units}")
        if sold_units != self.sold:
            out.append(f"sold {self.sold} != units of CONFIRMED orders {sold_units}")
        if self.overdue_ms > 0:
            out.append(f"a hold is {self.overdue_ms} ms past its deadline: is a sweeper running?")
        out.extend(self.order_problems[:5])
        if len(self.order_problems) > 5:
            out.append(f"... {len(self.order_problems) - 5} more order(s) with problems")
        return out


class Inventory:
    """The gateway's view of Redis. Every Redis failure leaves as BackendUnavailable."""

    def __init__(
        self,
        redis: Client,
        scripts: ScriptRegistry,
        settings: Settings,
        *,
        fast: Executor | None = None,
        two_phase: bool | None = None,
    ) -> None:
        self.redis = redis
        self.fast = fast  # runs the scripts when given (the multiplexed client)
        self.scripts = scripts
        self.settings = settings
        self._create = scripts["create_order"]
        self._configure = scripts["configure_sku"]
        self._audit = scripts["audit_sku"]
        self._confirm = scripts["confirm_payment"]
        self._claim = scripts["claim_key"]
        self._settle = scripts["settle_key"]
        self._fence = scripts["fence_key"]
        self._claim_guard = scripts["claim_guard"]
        self._release = scripts["release_guard"]
        # Cluster mode: a user's key and the SKU live in different slots, so intake claims
        # the key first (README "Redis Cluster"). Tests also run it on one server.
        self.two_phase = settings.redis_cluster if two_phase is None else two_phase
        self._stale_ms = settings.claim_stale_ms
        self.layouts = Layouts(redis)
        self._bucket_counts = self.layouts.counts  # read on the hot path without a call
        self._hold_ttl_ms = settings.hold_ttl_s * 1000
        self._idem_ttl_ms = settings.idempotency_ttl_s * 1000
        # what a 202 promises (orders, payments) runs on this: with WAITAOF when asked
        self._acked: Executor = acked(settings, fast or redis)
        self.mover = Mover(self._acked, scripts)
        # "1": replays write, so the WAITAOF after them covers what they answer for
        self._durable = "1" if self._acked is not (fast or redis) else ""

    async def create_order(
        self,
        req: OrderRequest,
        idempotency_key: str,
        *,
        queue_only: bool = False,
        now_ms: int | None = None,
    ) -> tuple[CreateResult, bytes]:
        """Hold stock for one order (or, queue_only, just enqueue it): one round trip on one
        server; in cluster mode three (claim, order, settle; see `_create_two_phase`). A
        bucketed SKU's order goes to the shopper's bucket, refilled from the others when short.

        Returns (result, payload); the payload is described in lua/create_order.lua.
        """
        count = self._bucket_counts.get(req.sku_id, 1)
        ks, args, tags, bucket = self._order_call(req, idempotency_key, count, queue_only, now_ms)
        if self.two_phase:
            result, payload = await self._create_two_phase(req, idempotency_key, ks, args)
        else:  # the hot path on one server: no coroutine in between
            code, payload = await self._call_resending(self._create, ks, args)
            result = CreateResult(code)
        if result is CreateResult.LAYOUT:  # the SKU has stock buckets this process did not know
            count = int(payload)
            self.layouts.remember(req.sku_id, count)
            ks, args, tags, bucket = self._order_call(
                req, idempotency_key, count, queue_only, now_ms
            )
            result, payload = await self._send_order(req, idempotency_key, ks, args)
        # The shopper's bucket is short: move stock in from the others, then decide again
        # (the refusal left no trace); other shoppers of the bucket may take what came first.
        # Nothing moved: every other bucket was empty, and a last look at this one (where
        # other shoppers' refills may have just put stock) decides.
        tries = REFILL_TRIES
        while result is CreateResult.SOLD_OUT and tags is not None and not queue_only:
            if not tries:  # stock kept moving to other shoppers: not known to be sold out
                raise StockMoving()
            need = req.quantity - int(payload)
            moved = await self._run(self.mover.refill(tags, bucket, need))
            if moved < 0:
                raise StockMoving()  # a transfer stayed in flight: ask again shortly
            result, payload = await self._send_order(req, idempotency_key, ks, args)
            tries -= 1
            if not moved:
                break
        return result, payload

    def _order_call(
        self,
        req: OrderRequest,
        idempotency_key: str,
        count: int,
        queue_only: bool,
        now_ms: int | None,
    ) -> tuple[list[str], list[Any], list[str] | None, int]:
        """KEYS and ARGV of create_order.lua for the shopper's bucket of a SKU with `count`
        buckets, the SKU's bucket tags (None: not bucketed) and the shopper's bucket."""
        tag, tags, bucket = req.sku_id, None, 0
        if count > 1:
            tags = self.layouts.tags(req.sku_id, count)
            bucket = keys.bucket_of(req.user_id, count)
            tag = tags[bucket]
        sk = keys.SkuKeys(tag)
        order_id = keys.new_order_id(tag)
        ks = [
            sk.sku,
            sk.users,
            sk.holds,
            sk.stream,
            sk.order(order_id),
            sk.idempotency(req.user_id, idempotency_key),
            sk.accepted,
        ]
        if not self.two_phase:
            ks.append(keys.key_guard(req.user_id, idempotency_key))
        args = [
            order_id,
            req.user_id,
            req.sku_id,
            req.quantity,
            req.promotion_id,
            req.fingerprint(),
            self._hold_ttl_ms,
            self._idem_ttl_ms,
            "" if now_ms is None else now_ms,
            "queue" if queue_only else "hold",
            self.settings.queue_max,
            accepted_member(req.user_id, idempotency_key),
            "",  # the claim's token (cluster mode)
            "",  # replay only (cluster mode)
            count,
            self._durable,
        ]
        return ks, args, tags, bucket

    async def _send_order(
        self, req: OrderRequest, idempotency_key: str, ks: list[str], args: list[Any]
    ) -> tuple[CreateResult, bytes]:
        if self.two_phase:
            return await self._create_two_phase(req, idempotency_key, ks, args)
        code, payload = await self._call_resending(self._create, ks, args)
        return CreateResult(code), payload

    async def _create_two_phase(
        self,
        req: OrderRequest,
        idempotency_key: str,
        ks: list[str],
        args: list[Any],
    ) -> tuple[CreateResult, bytes]:
        """Intake where the user's key and the SKU are in different slots: claim (user, key)
        in the user's slot, run the SKU's script, settle the claim (accepted, or released for
        a refusal). A gateway that dies between phases leaves a claim that the next request
        with that key recovers once it is `claim_stale_ms` old: the abandoned request's token
        is fenced on its SKU first, so a late delivery of it can never add a second order."""
        guard = keys.key_guard(req.user_id, idempotency_key)
        fingerprint = req.fingerprint()
        token = args[0].partition(".")[0]  # unique to this request (its order id)
        now = args[8]
        for _ in range(3):
            code, old_token, old_fingerprint = await self._call_resending(
                self._claim, [guard], (token, fingerprint, self._stale_ms, self._idem_ttl_ms, now)
            )
            claim = Claim(code)
            if claim is Claim.STALE:
                await self._recover(
                    req.user_id, idempotency_key, text(old_token), text(old_fingerprint)
                )
                continue
            if claim is Claim.KEY_REUSED:
                return CreateResult.KEY_REUSED, b""
            if claim is Claim.IN_USE:
                return CreateResult.IN_USE, b""
            if claim is not Claim.CLAIMED:  # an order exists or is being made: only a replay
                code, payload = await self._call_resending(
                    self._create, ks, [*args[:12], "", "1", *args[14:]]
                )
                return CreateResult(code), payload
            try:
                code, payload = await self._call_resending(
                    self._create, ks, [*args[:12], token, "", *args[14:]]
                )
            except NotApplied:
                # surely not run (no connection, or its slot is moving): the claim goes, so the
                # shopper's retry is decided afresh instead of waiting for it to go stale
                with contextlib.suppress(BackendUnavailable):
                    await self._call_resending(
                        self._settle, [guard], (token, "release", fingerprint, self._idem_ttl_ms)
                    )
                raise
            result = CreateResult(code)
            if result is not CreateResult.CLAIM_LOST:
                accepted = result in (CreateResult.CREATED, CreateResult.REPLAYED)
                try:
                    await self._call_resending(
                        self._settle,
                        [guard],
                        (token, "done" if accepted else "release", fingerprint, self._idem_ttl_ms),
                    )
                except BackendUnavailable:
                    # the answer stands: the claim is recovered once stale (its order is found)
                    log.warning("idempotency claim not settled; recovered when stale")
            return result, payload
        return CreateResult.IN_USE, b""

    async def _recover(
        self, user_id: str, idempotency_key: str, token: str, fingerprint: str
    ) -> None:
        """Settle an abandoned claim: fence its token on its SKU (or find its order there),
        then mark the claim accepted or release it."""
        sku_id = fingerprint.partition("|")[0]
        count = await self._run(self.layouts.count(sku_id)) or 1
        tag = self.layouts.tags(sku_id, count)[keys.bucket_of(user_id, count)]
        record = keys.SkuKeys(tag).idempotency(user_id, idempotency_key)
        exists = await self._call_resending(
            self._fence, [record], (token, self._idem_ttl_ms, FENCED_TOKENS_KEPT)
        )
        outcome = "done" if exists else "release"
        guard = keys.key_guard(user_id, idempotency_key)
        await self._call_resending(
            self._settle, [guard], (token, outcome, fingerprint, self._idem_ttl_ms)
        )
        log.warning(
            "recovered an abandoned idempotency claim of user %s on SKU %s (%s)",
            user_id,
            sku_id,
            "its order exists" if exists else "no order: fenced",
        )

    async def confirm_payment(
        self, order_id: str, payment_id: str, *, now_ms: int | None = None
    ) -> PaymentResult:
        """Record one payment confirmation durably and queue it for the finalizers."""
        parts = keys.split_order_id(order_id)
        if parts is None:
            return PaymentResult.UNKNOWN_ORDER
        sk = keys.SkuKeys(parts[1])
        ks = [sk.payment(payment_id), sk.order(order_id), sk.holds, sk.stream]
        args = (payment_id, order_id, "" if now_ms is None else now_ms, self._durable)
        guard = keys.payment_guard(payment_id)
        if not self.two_phase:
            (code,) = await self._call_resending(self._confirm, [*ks, guard], args)
            return PaymentResult(code)
        # Cluster mode: the payment_id is claimed in its own slot first. A crash in between
        # leaves it claimed for this order, which is what a retry of it needs.
        first = text(await self._call_resending(self._claim_guard, [guard], (order_id,)))
        if first and first != order_id:
            return PaymentResult.PAYMENT_REUSED
        (code,) = await self._call_resending(self._confirm, ks, args)
        result = PaymentResult(code)
        if result is PaymentResult.UNKNOWN_ORDER:  # never bound to an order that is not there
            await self._call_resending(self._release, [guard], (order_id,))
        return result

    async def accepted_since(self, sku_id: str, since_ms: float) -> tuple[set[str], float]:
        """Members `<key>:<user>` of the SKU's accepted sets (every bucket's) whose replay
        deadline is at or after `since_ms`, and the latest deadline seen (to ask only for
        newer ones next time)."""
        members: set[str] = set()
        latest = since_ms
        for tag in await self._run(self.layouts.all_tags(sku_id)):
            raw = await self._run(
                self.redis.zrangebyscore(
                    keys.SkuKeys(tag).accepted, since_ms, "+inf", withscores=True
                )
            )
            latest = max((score for _, score in raw), default=latest)
            members.update(m.decode() for m, _ in raw)
        return members, latest

    async def configure_sku(
        self, sku_id: str, cfg: SkuConfig, *, by: str = DEFAULT_OPERATOR, client: str = ""
    ) -> tuple[ConfigureResult, int]:
        """Create or change a SKU and append the change (who, from where, before and after) to
        its audit log `fg:{S}:changes`, atomically; a refused change records nothing. Returns
        (result, units held plus sold when refused, else 0)."""
        home = keys.SkuKeys(sku_id)
        args = [
            cfg.promotion_id,
            cfg.stock,
            cfg.per_user_limit,
            "" if cfg.starts_at is None else cfg.starts_at,
            "" if cfg.ends_at is None else cfg.ends_at,
            by,
            client,
            CHANGES_KEPT,
        ]
        # Registry first: a SKU in the registry without config is harmless, the reverse
        # would hide a SKU from the audit.
        await self._run(self.redis.sadd(keys.SKU_REGISTRY, sku_id))
        if cfg.buckets == 1:
            code, detail = await self._call(
                self._configure, [home.sku, home.changes], (*args, "set", 1, "", "1")
            )
        else:
            code, detail = await self._configure_buckets(sku_id, cfg, args)
        if code > 0:
            self.layouts.remember(sku_id, cfg.buckets)
            # More may be available now: gateways that remember the SKU as sold out forget it.
            await self._run(self.redis.publish(keys.NOTICES, keys.stock_notice(sku_id)))
        return ConfigureResult(code), int(detail)

    async def _configure_buckets(
        self, sku_id: str, cfg: SkuConfig, args: list[Any]
    ) -> tuple[int, int]:
        """A bucketed SKU: every bucket gets the configuration; bucket 0 holds the total and
        the change log, and decides (a refusal writes nothing anywhere). Created: buckets
        1..K-1 empty first, then bucket 0 with the whole stock (the SKU exists from then on),
        then an even share moved into each other bucket by journaled transfers, so whatever
        fails or runs twice, the buckets never hold more than the total. Changed: bucket 0
        first, its stock moved by the difference to the stored total inside its script (a
        decrease first moves available stock into bucket 0); then the other buckets get the
        new settings."""
        tags = self.layouts.tags(sku_id, cfg.buckets)
        count = len(tags)
        home = keys.SkuKeys(sku_id)
        promotion, stored, total, available0 = await self._run(
            self.redis.hmget(home.sku, "promotion_id", "buckets", "total_stock", "available")
        )
        if promotion is not None and int(stored or 1) != count:
            return ConfigureResult.BUCKETS_FIXED, int(stored or 1)  # nothing written
        creating = promotion is None

        async def others() -> None:
            for tag in tags[1:]:
                bk = keys.SkuKeys(tag)
                await self._call(
                    self._configure,
                    [bk.sku, bk.changes],
                    (*args[:1], 0, *args[2:], "init", count, "", "0"),  # a new bucket: empty
                )

        if creating:
            await others()
        elif cfg.stock < int(total) and int(available0 or 0) < int(total) - cfg.stock:
            short = int(total) - cfg.stock - int(available0 or 0)
            await self._run(self.mover.refill(tags, 0, short))
        code, detail = await self._call(
            self._configure,
            [home.sku, home.changes],
            (*args[:1], cfg.stock, *args[2:], "total", count, cfg.stock, "1"),
        )
        if code == ConfigureResult.STOCK_BELOW_COMMITTED:
            view = await self.get_sku(sku_id)
            return code, 0 if view is None else view.held + view.sold
        if code == ConfigureResult.CREATED:
            for b, tag in enumerate(tags[1:], 1):  # bucket 0 keeps the first share
                share = cfg.stock // count + (1 if b < cfg.stock % count else 0)
                await self._run(self.mover.move(sku_id, tag, share))
        elif code > 0:
            await others()
        return code, detail

    async def get_sku(self, sku_id: str) -> SkuView | None:
        raw = await self._run(self.redis.hgetall(keys.SkuKeys(sku_id).sku))
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        stock, available, held, sold = (int(h[f]) for f in ("stock", "available", "held", "sold"))
        buckets, in_transit = int(h.get("buckets", 1)), 0
        if buckets > 1:
            for tag in self.layouts.tags(sku_id, buckets)[1:]:
                figures = await self._run(
                    self.redis.hmget(keys.SkuKeys(tag).sku, "stock", "available", "held", "sold")
                )
                b_stock, b_available, b_held, b_sold = (int(v or 0) for v in figures)
                stock, available = stock + b_stock, available + b_available
                held, sold = held + b_held, sold + b_sold
            # units taken out of one bucket and not yet given to another: still for sale
            in_transit = int(h["total_stock"]) - stock
            stock, available = stock + in_transit, available + in_transit
        return SkuView(
            sku_id=sku_id,
            promotion_id=h["promotion_id"],
            stock=stock,
            available=available,
            held=held,
            sold=sold,
            per_user_limit=int(h["per_user_limit"]),
            starts_at=int(h["starts_at"]) if "starts_at" in h else None,
            ends_at=int(h["ends_at"]) if "ends_at" in h else None,
            buckets=buckets,
            bucket_tags=self.layouts.tags(sku_id, buckets) if buckets > 1 else None,
            in_transit=in_transit,
        )

    async def sku_changes(self, sku_id: str, limit: int = 20) -> list[SkuChange] | None:
        """The SKU's latest configuration changes, newest first; None for a SKU never
        configured."""
        sk = keys.SkuKeys(sku_id)

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(sk.sku)
                pipe.xrevrange(sk.changes, count=limit)
                result: list[Any] = await pipe.execute()
                return result

        exists, entries = await self._run(read())
        if not exists:
            return None
        return [sku_change(entry_id, fields) for entry_id, fields in entries]

    async def get_order(self, order_id: str) -> OrderView | None:
        key = keys.order_key(order_id)
        if key is None:
            return None
        raw = await self._run(self.redis.hgetall(key))
        if not raw:
            return None
        h = {k.decode(): v for k, v in raw.items()}
        deadline = h.get("hold_expires_at")
        return OrderView(
            order_id=order_id,
            status=h["status"].decode(),
            user_id=h["user_id"].decode(),
            sku_id=h["sku_id"].decode(),
            quantity=int(h["quantity"]),
            promotion_id=h["promotion_id"].decode(),
            created_at=int(h["created_at"]),
            hold_expires_at=int(deadline) if deadline is not None else None,
            history=msgspec.Raw(h["history"]),
        )

    async def sku_ids(self) -> list[str]:
        members = await self._run(self.redis.smembers(keys.SKU_REGISTRY))
        return sorted(m.decode() for m in members)

    async def audit_sku(
        self, sku_id: str, *, now_ms: int | None = None, slack_ms: int | None = None
    ) -> AuditRow | None:
        """One SKU's figures, its holds and every order record, checked against each other.
        With `now_ms` and `slack_ms`, a hold past its deadline by more than `slack_ms` counts
        as a breach (the sweeper should have released it).

        A bucketed SKU is audited bucket by bucket (each bucket's invariants are exact: its
        scripts are atomic), then as a whole: the configured total must equal the buckets'
        stock plus the units in transfers not yet received. Buckets are read one after the
        other, so a transfer completing in between is read again (up to 3 tries)."""
        count = await self._run(self.layouts.count(sku_id))
        if count is None or count == 1:
            return await self._audit_bucket(sku_id, now_ms, slack_ms)
        tags = self.layouts.tags(sku_id, count)
        for _ in range(3):
            total = int(await self._run(self.redis.hget(keys.SkuKeys(sku_id).sku, "total_stock")))
            rows = [await self._audit_bucket(tag, now_ms, slack_ms) for tag in tags]
            transit = await self._in_transit(tags)
            combined = combine_rows(sku_id, tags, rows, total, transit)
            if not any(p.startswith("total stock") for p in combined.order_problems):
                break
        return combined

    async def _in_transit(self, tags: list[str]) -> int:
        """Units journaled out of a bucket and not yet received by another."""
        units = 0
        for tag in tags:
            sk = keys.SkuKeys(tag)
            for transfer in journal(await self._run(self.redis.hgetall(sk.transfers))):
                received = await self._run(
                    self.redis.zscore(keys.SkuKeys(transfer.to_tag).received, transfer.transfer_id)
                )
                if received is None:
                    units += transfer.units
        return units

    async def _audit_bucket(
        self, tag: str, now_ms: int | None, slack_ms: int | None
    ) -> AuditRow | None:
        sku_id = tag
        sk = keys.SkuKeys(tag)
        row = await self._call(self._audit, [sk.sku, sk.users, sk.holds], (sk.orders_prefix,))
        if not row[0]:
            return None
        orders: dict[str, tuple[int, int]] = {}
        problems: list[str] = []
        async for batch in self._order_records(sk):
            for key, (status, qty, history, payment_id, in_time, paid_at) in batch:
                st = status.decode() if status else "?"
                count, units = orders.get(st, (0, 0))
                orders[st] = (count + 1, units + int(qty or 0))
                problem = history_problem(st, history or b"", bool(payment_id))
                if problem:
                    problems.append(f"{key}: {problem}")
                stuck = st == "HELD" and in_time == b"1" and paid_at is not None
                if stuck and now_ms is not None and slack_ms is not None:
                    if now_ms - int(paid_at) > slack_ms:
                        problems.append(
                            f"{key}: paid in time but not confirmed after "
                            f"{(now_ms - int(paid_at)) // 1000} s (finalizer down? dead letters?)"
                        )
        (stock, available, held, sold, users_total, holds_count, holds_units, not_held) = (
            int(x) for x in row[1:9]
        )
        earliest, backlog = int(row[9]), int(row[10])
        overdue = 0
        if earliest and now_ms is not None and slack_ms is not None:
            overdue = max(0, now_ms - earliest - slack_ms)
        return AuditRow(
            sku_id,
            stock,
            available,
            held,
            sold,
            users_total,
            holds_count,
            holds_units,
            not_held,
            earliest,
            backlog,
            orders,
            problems,
            overdue,
        )

    async def _order_records(self, sk: keys.SkuKeys) -> Any:
        keys_seen: list[bytes] = []
        async for key in self.redis.scan_iter(match=f"{sk.orders_prefix}*", count=1000):
            keys_seen.append(key)
            if len(keys_seen) >= 500:
                yield await self._read_orders(keys_seen)
                keys_seen = []
        if keys_seen:
            yield await self._read_orders(keys_seen)

    async def _read_orders(self, ks: list[bytes]) -> list[tuple[str, list[Any]]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in ks:
                pipe.hmget(
                    k, "status", "quantity", "history", "payment_id", "paid_in_time", "paid_at"
                )
            rows = await pipe.execute()
        return [(k.decode(), r) for k, r in zip(ks, rows, strict=True)]

    async def ping(self) -> bool:
        """Redis answers and every script is loaded (reloaded here after a restart)."""
        try:
            if not await self.redis.ping():
                return False
            if self.fast is not None:
                await self.fast.execute_command("PING")
            if not await self.scripts.loaded(self.redis):
                await self.scripts.load_all(self.redis)
            return True
        except REDIS_FAILURES:
            return False

    async def _call(self, script: Any, ks: list[str], args: tuple[Any, ...]) -> Any:
        return await self._run(script(self.fast or self.redis, ks, args))

    @staticmethod
    async def _run(awaitable: Any) -> Any:
        """`store.call`, answering Any: redis-py's reply types are looser than its replies."""
        return await call(awaitable)

    async def _call_resending(self, script: Any, ks: list[str], args: Sequence[Any]) -> Any:
        """`_call` for an idempotent script, sent once more when its answer may have been lost.

        The script may have run and only its answer been lost. Sending it again with the same
        idempotency key (or payment_id) is safe: if the first ran, this one replays its answer;
        if not, this one decides. Either way one effect, and the caller learns which.
        """
        client = self._acked  # the hot path: no wrapper coroutines in between
        try:
            return await script(client, ks, args)
        except REDIS_FAILURES as exc:  # what `store.call` turns into BackendUnavailable
            if isinstance(exc, (NotSent, SlotMoving)):
                raise NotApplied() from exc
            if not _maybe_sent(exc):
                raise BackendUnavailable() from exc
        return await self._run(script(client, ks, args))


def combine_rows(
    sku_id: str, tags: list[str], rows: list[AuditRow | None], total: int, transit: int
) -> AuditRow:
    """One bucketed SKU's audit row: the buckets' figures summed (units in transit counted as
    available), each bucket's own breaches named, and the total checked against them."""
    present = [r for r in rows if r is not None]
    problems = [f"bucket {tag} missing" for tag, r in zip(tags, rows, strict=True) if r is None]
    for r in present:
        problems += [f"bucket {r.sku_id}: {b}" for b in r.breaches()]
    stock = sum(r.stock for r in present)
    if total != stock + transit:
        problems.insert(0, f"total stock {total} != buckets' stock {stock} + in transit {transit}")
    orders: dict[str, tuple[int, int]] = {}
    for r in present:
        for status, (n, units) in r.orders.items():
            n0, u0 = orders.get(status, (0, 0))
            orders[status] = (n0 + n, u0 + units)
    deadlines = [r.earliest_deadline_ms for r in present if r.earliest_deadline_ms]
    return AuditRow(
        sku_id,
        stock + transit,
        sum(r.available for r in present) + transit,
        sum(r.held for r in present),
        sum(r.sold for r in present),
        sum(r.users_total for r in present),
        sum(r.holds_count for r in present),
        sum(r.holds_units for r in present),
        sum(r.holds_not_held for r in present),
        min(deadlines, default=0),
        sum(r.backlog for r in present),
        orders,
        problems,
        max((r.overdue_ms for r in present), default=0),
    )


def sku_change(entry_id: bytes, fields: dict[bytes, bytes]) -> SkuChange:
    """One entry of `fg:{S}:changes` as the API shows it (see lua/configure_sku.lua)."""
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return SkuChange(
        id=entry_id.decode(),
        at=int(f["at"]),
        by=f["by"],
        client=f["client"] or None,
        action=f["action"],
        before=_sku_settings(f, "before:") if "before:stock" in f else None,  # None: created
        after=_sku_settings(f, "after:"),
    )


def _sku_settings(f: dict[str, str], prefix: str) -> SkuSettings:
    def opt(name: str) -> int | None:
        value = f.get(prefix + name, "")
        return int(value) if value else None

    return SkuSettings(
        promotion_id=f[prefix + "promotion_id"],
        stock=int(f[prefix + "stock"]),
        per_user_limit=int(f[prefix + "per_user_limit"]),
        starts_at=opt("starts_at"),
        ends_at=opt("ends_at"),
    )


def accepted_member(user_id: str, idempotency_key: str) -> str:
    """The accepted-set member of one (user, key): the key is a UUID, so `:` splits them."""
    return f"{idempotency_key}:{user_id}"


def _maybe_sent(exc: BaseException | None) -> bool:
    """Could the failed command have run on the server with its answer lost?

    No for an answer the server gave (an error reply) and for a command that surely never
    left: a failed connect or an empty pool (redis-py's "Error N connecting to ...", "Timeout
    connecting to server", "No connection available."). Any other connection failure counts
    as maybe sent: resending is safe, answering "nothing was held" after a lost answer is not.
    """
    if isinstance(exc, NotSent) or not isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, OSError)
    ):
        return False
    text = str(exc)
    return "connecting to" not in text and "No connection available" not in text
