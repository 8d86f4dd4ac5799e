"""After a run: wait for the finalizers to drain, then count what must be zero.

- oversold: for a SKU, held + sold > stock, stock != available + held + sold, a negative
  counter, or the units of its HELD and CONFIRMED order records exceed its stock;
- duplicate: one (user, idempotency key) answered with two order ids, one order id given to
  two (user, key) pairs, or a user holding more units of a SKU than its per-user limit;
- lost: a recorded 202 whose order record is not in Redis or that `GET /api/v1/order/{id}`
  does not answer as that shopper's order, or a recorded payment whose record is missing;
- unsettled: after the drain, an order still QUEUED, or a paid order still HELD/QUEUED.

Each count is of distinct subjects: SKUs oversold; (user, key) pairs, (SKU, user) pairs and
order ids duplicated; orders and payments lost; orders unsettled.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.store import keys

ACTIVE = ("HELD", "CONFIRMED")  # statuses whose units count against stock and the limit


Problems = dict[str, list[str]]  # what is wrong (a SKU, an order, a key) -> why


@dataclass
class Findings:
    """Each count is the number of SKUs, orders, keys or users with a problem."""

    oversold: Problems = field(default_factory=dict)
    duplicate: Problems = field(default_factory=dict)
    lost: Problems = field(default_factory=dict)
    unsettled: Problems = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    skus: dict[str, dict[str, int]] = field(default_factory=dict)
    recorded: int = 0  # 202 answers recorded by the shoppers (replays included)
    orders: int = 0  # distinct order ids among them
    replays: int = 0
    payments: int = 0
    records: int = 0  # order records in Redis

    def counts(self) -> dict[str, int]:
        return {
            "oversold": len(self.oversold),
            "duplicate": len(self.duplicate),
            "lost": len(self.lost),
            "unsettled": len(self.unsettled),
        }


def tags_of(client: Any, sku: str) -> list[str]:
    """The SKU's bucket tags (just the SKU when it is not bucketed)."""
    return keys.bucket_tags(sku, int(client.hget(keys.SkuKeys(sku).sku, "buckets") or 1))


def _add(problems: Problems, subject: str, reason: str) -> None:
    problems.setdefault(subject, []).append(reason)


def drain(client: redis.Redis, skus: Iterable[str], timeout_s: float) -> float | None:
    """Seconds until every SKU's backlog, pending and undelivered stream entries are 0 (the
    finalizers have applied every order and payment); None after `timeout_s`."""
    start = time.monotonic()
    while True:
        busy = 0
        for sku in skus:
            for tag in tags_of(client, sku):
                sk = keys.SkuKeys(tag)
                busy += int(client.hget(sk.sku, "backlog") or 0)
                if client.exists(sk.stream):
                    for group in client.xinfo_groups(sk.stream):
                        busy += int(group.get("pending") or 0) + int(group.get("lag") or 0)
        waited = time.monotonic() - start
        if not busy:
            return waited
        if waited > timeout_s:
            return None
        time.sleep(0.2)


def read_records(path: Path, findings: Findings) -> tuple[list[dict[str, Any]], list[Any]]:
    """The recorded 202 answers: (orders, payments)."""
    orders: list[dict[str, Any]] = []
    payments: list[dict[str, Any]] = []
    if not path.exists():
        return orders, payments
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            _add(findings.lost, f"{path.name} line {n}", f"unreadable: {line[:80]!r}")
            continue
        (payments if rec.get("kind") == "payment" else orders).append(rec)
    return orders, payments


def _order_records(client: redis.Redis, sku: str) -> Iterator[tuple[str, list[Any]]]:
    """(key, [status, user_id, quantity]) of every order record of a SKU."""
    batch: list[str] = []

    def flush() -> list[tuple[str, list[Any]]]:
        pipe = client.pipeline(transaction=False)
        for k in batch:
            pipe.hmget(k, "status", "user_id", "quantity")
        return list(zip(batch, pipe.execute(), strict=True))

    for key in client.scan_iter(match=f"{keys.SkuKeys(sku).orders_prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _figures(client: Any, sku: str, findings: Findings) -> tuple[dict[str, int], list[str], int]:
    """The SKU's figures (its buckets added up, units in transit counted as available), its
    bucket tags and per-user limit; a bucket whose own equation fails is oversold."""
    home = client.hgetall(keys.SkuKeys(sku).sku)
    names = ("stock", "available", "held", "sold", "backlog")
    fig = dict.fromkeys(names, 0)
    tags = tags_of(client, sku)
    for tag in tags:
        h = client.hgetall(keys.SkuKeys(tag).sku)
        b = {k: int(h.get(k, 0)) for k in names}
        if b["stock"] != b["available"] + b["held"] + b["sold"]:
            _add(findings.oversold, tag, f"stock != available + held + sold {b}")
        fig = {k: fig[k] + b[k] for k in names}
    if len(tags) > 1:  # units between buckets: neither held nor sold, still for sale
        in_transit = int(home.get("total_stock", 0)) - fig["stock"]
        fig["stock"] += in_transit
        fig["available"] += in_transit
    return fig, tags, int(home.get("per_user_limit", 0))


def check_skus(client: redis.Redis, skus: Iterable[str], findings: Findings) -> None:
    """Oversold and per-user limit, from the SKU counters and every order record."""
    for sku in skus:
        fig, tags, limit = _figures(client, sku, findings)
        findings.skus[sku] = fig
        stock, available, held, sold = (fig[k] for k in ("stock", "available", "held", "sold"))
        if held + sold > stock:
            _add(findings.oversold, sku, f"held {held} + sold {sold} > stock {stock}")
        if stock != available + held + sold:
            _add(findings.oversold, sku, f"stock {stock} != available + held + sold {fig}")
        if min(available, held, sold) < 0:
            _add(findings.oversold, sku, f"negative counter {fig}")
        units: Counter[str] = Counter()
        per_user: Counter[str] = Counter()
        records = (r for tag in tags for r in _order_records(client, tag))
        for key, (status, user, qty) in records:
            findings.records += 1
            findings.statuses[status or "?"] += 1
            if status in ACTIVE:
                units[status] += int(qty or 0)
                per_user[user] += int(qty or 0)
            if status == "QUEUED":
                _add(findings.unsettled, key, "still QUEUED after the drain")
        if sum(units.values()) > stock:
            _add(findings.oversold, sku, f"units of HELD + CONFIRMED orders {dict(units)}")
        for user, n in per_user.items():
            if n > limit:
                _add(findings.duplicate, f"{sku}/{user}", f"holds {n} units, limit {limit}")


def check_records(
    client: redis.Redis,
    base_url: str,
    orders: list[dict[str, Any]],
    payments: list[dict[str, Any]],
    findings: Findings,
) -> None:
    """Duplicate, lost and unsettled, from what the shoppers were told."""
    findings.recorded = len(orders)
    findings.replays = sum(bool(r.get("replayed")) for r in orders)
    findings.payments = len(payments)
    owner = _check_answers(orders, findings)
    findings.orders = len(owner)
    statuses = _check_found(client, base_url, owner, findings)
    for pay in payments:
        order_id, payment_id = pay["order_id"], pay["payment_id"]
        parts = keys.split_order_id(order_id)
        if parts is None or not client.exists(keys.SkuKeys(parts[1]).payment(payment_id)):
            _add(findings.lost, f"payment {payment_id}", f"no payment record ({order_id})")
        status = statuses.get(order_id)
        if status in ("HELD", "QUEUED"):
            _add(findings.unsettled, order_id, f"paid ({payment_id}) but still {status}")


def _check_answers(
    orders: list[dict[str, Any]], findings: Findings
) -> dict[str, set[tuple[str, str]]]:
    """One order per (user, key) and one (user, key) per order; {order_id: {(user, sku)}}."""
    by_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    owner: dict[str, set[tuple[str, str]]] = defaultdict(set)
    holders: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for rec in orders:
        by_key[(rec["user_id"], rec["key"])].add(rec["order_id"])
        owner[rec["order_id"]].add((rec["user_id"], rec["sku_id"]))
        holders[rec["order_id"]].add((rec["user_id"], rec["key"]))
    for (user, key), ids in by_key.items():
        if len(ids) > 1:
            _add(findings.duplicate, f"{user}/{key}", f"{len(ids)} orders: {sorted(ids)}")
    for order_id, who in holders.items():
        if len(who) > 1:
            _add(findings.duplicate, order_id, f"given to {sorted(who)}")
    return owner


def _check_found(
    client: redis.Redis,
    base_url: str,
    owner: dict[str, set[tuple[str, str]]],
    findings: Findings,
) -> dict[str, Any]:
    """Every recorded order is in Redis and answered by GET as its shopper's; {id: status}."""
    ids = sorted(owner)
    pipe = client.pipeline(transaction=False)
    for order_id in ids:
        pipe.hmget(keys.order_key(order_id) or "-", "user_id", "sku_id")
    for order_id, (user, sku) in zip(ids, pipe.execute(), strict=True):
        if user is None:
            _add(findings.lost, order_id, "no order record in Redis")
        elif (user, sku) not in owner[order_id]:
            _add(findings.lost, order_id, f"the Redis record is {user}/{sku}, not the shopper's")
    views = asyncio.run(_get_orders(base_url, ids))
    for order_id in ids:
        code, view = views[order_id]
        if code != 200 or (view.get("user_id"), view.get("sku_id")) not in owner[order_id]:
            _add(findings.lost, order_id, f"GET answered {code} {str(view)[:120]}")
    return {order_id: view.get("status") for order_id, (_, view) in views.items()}


async def _get_orders(
    base_url: str, ids: list[str], concurrency: int = 32
) -> dict[str, tuple[int, dict[str, Any]]]:
    """GET every order, `concurrency` at a time: {order_id: (status code, body)}."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    queue = iter(ids)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            for order_id in queue:
                r = await client.get(f"/api/v1/order/{order_id}")
                try:
                    body = r.json()
                except ValueError:
                    body = {"raw": r.text[:200]}
                out[order_id] = (r.status_code, body if isinstance(body, dict) else {})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out
