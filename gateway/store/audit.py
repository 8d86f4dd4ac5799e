"""The audit: every SKU's figures, holds and order records checked against each other and
against the order-state contract (`outcomes.history_problem`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.store import calls, keys
from gateway.store.buckets import Layouts, journal
from gateway.store.outcomes import AuditFigures, history_problem
from gateway.store.sending import Sender
from gateway.transport.scripts import ScriptRegistry


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


class Audit:
    def __init__(self, send: Sender, scripts: ScriptRegistry, layouts: Layouts) -> None:
        self.send = send
        self.redis = send.redis
        self.layouts = layouts
        self._audit = scripts["audit_sku"]
        self._run = send.run

    async def order_index(self) -> dict[str, list[bytes]]:
        """Every order record's key, by bucket tag: one scan of the keyspace for an audit of
        every SKU, where a scan per SKU (each of the whole keyspace) grew with SKUs x keys."""
        index: dict[str, list[bytes]] = {}
        start = len(keys.PREFIX) + 2  # "fg:{"
        async for key in self.redis.scan_iter(match=f"{keys.PREFIX}:{{*}}:o:*", count=1000):
            index.setdefault(key[start : key.index(b"}")].decode(), []).append(key)
        return index

    async def audit_sku(
        self,
        sku_id: str,
        *,
        now_ms: int | None = None,
        slack_ms: int | None = None,
        index: dict[str, list[bytes]] | None = None,
    ) -> AuditRow | None:
        """One SKU's figures, its holds and every order record, checked against each other.
        With `now_ms` and `slack_ms`, a hold past its deadline by more than `slack_ms` counts
        as a breach (the sweeper should have released it).

        A bucketed SKU is audited bucket by bucket (each bucket's invariants are exact: its
        scripts are atomic), then as a whole: the configured total must equal the buckets'
        stock plus the units in transfers not yet received. Buckets are read one after the
        other, so a transfer completing in between is read again (up to 3 tries).

        `index` (`order_index`): where the order records are, for an audit of many SKUs;
        without it this SKU's are found by a scan of its own."""
        count = await self._run(self.layouts.count(sku_id))
        if count is None or count == 1:
            return await self._audit_bucket(sku_id, now_ms, slack_ms, index)
        tags = self.layouts.tags(sku_id, count)
        for _ in range(3):
            total = int(await self._run(self.redis.hget(keys.SkuKeys(sku_id).sku, "total_stock")))
            rows = [await self._audit_bucket(tag, now_ms, slack_ms, index) for tag in tags]
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
        self,
        tag: str,
        now_ms: int | None,
        slack_ms: int | None,
        index: dict[str, list[bytes]] | None,
    ) -> AuditRow | None:
        sk = keys.SkuKeys(tag)
        call = calls.audit_sku(sk, orders_prefix=sk.orders_prefix)
        figures = AuditFigures.of(await self.send.script(self._audit, *call))
        if not figures.exists:
            return None
        records = None if index is None else index.get(tag, [])
        orders, problems = await self._check_orders(sk, now_ms, slack_ms, records)
        problems += await self._check_draw(sk)
        earliest = figures.earliest_deadline_ms
        overdue = 0
        if earliest and now_ms is not None and slack_ms is not None:
            overdue = max(0, now_ms - earliest - slack_ms)
        return AuditRow(
            tag,
            figures.stock,
            figures.available,
            figures.held,
            figures.sold,
            figures.users_total,
            figures.holds_count,
            figures.holds_units,
            figures.holds_not_held,
            earliest,
            figures.backlog,
            orders,
            problems,
            overdue,
        )

    async def _check_orders(
        self,
        sk: keys.SkuKeys,
        now_ms: int | None,
        slack_ms: int | None,
        records: list[bytes] | None,
    ) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Every order record of one bucket (`records`, or found by a scan): (status ->
        (count, units), problems found)."""
        orders: dict[str, tuple[int, int]] = {}
        problems: list[str] = []
        async for batch in self._order_records(sk, records):
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
        return orders, problems

    async def _check_draw(self, sk: keys.SkuKeys) -> list[str]:
        """A fair start's draw against its pre-queue, read in one transaction (one slot): the
        ranking holds as many orders as the cursor says, and once done every pre-queued order,
        with no units left waiting."""

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hmget(sk.sku, "draw", "draw_cursor")
                pipe.scard(sk.prequeue)
                pipe.llen(sk.draw)
                pipe.hlen(sk.waiting)
                result: list[Any] = await pipe.execute()
                return result

        (draw, cursor), prequeued, ranked, waiting = await self._run(read())
        if draw is None:
            return []
        problems = []
        if int(cursor or 0) != ranked:
            problems.append(f"draw: cursor {int(cursor or 0)} != {ranked} orders ranked")
        if draw == b"done" and ranked != prequeued:
            problems.append(f"draw done: {ranked} orders ranked of {prequeued} pre-queued")
        if draw == b"done" and waiting:
            problems.append(f"draw done: {waiting} user(s) still have units waiting")
        return problems

    async def _order_records(self, sk: keys.SkuKeys, records: list[bytes] | None) -> Any:
        if records is not None:
            for i in range(0, len(records), 500):
                yield await self._read_orders(records[i : i + 500])
            return
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
