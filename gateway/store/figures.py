"""What Redis holds about the sale, read for the people on call: the intake mode and its last
switch, each SKU's figures (stock, available, held, sold, holds, backlog, pending, dead letters,
entries in and out), each relay group's lag (as its relays last wrote it), and the dead letters
themselves. Read only: pipelines, nothing written.

`flashgate status`, `flashgate dead`, `GET /metrics` and the admin overview read through here.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import keys, relaylag
from gateway.store.buckets import Layouts
from gateway.transport.connect import Client
from gateway.transport.streams import id_order


@dataclass(frozen=True, slots=True)
class SkuSample:
    sku_id: str
    drain_rate: float  # orders its finalizers decide per second of busy time (finalize.lua)
    stock: int
    available: int
    held: int
    sold: int
    holds: int  # active holds (orders holding units)
    backlog: int
    pending: int
    dead: int
    entries_in: int  # entries ever added to the SKU's stream
    entries_out: int  # entries ever added to its events stream


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic seconds
    mode: str
    last_switch: dict[str, Any] | None
    skus: list[SkuSample]
    relays: list[relaylag.RelayLag]  # each relay group's lag, as its relays last wrote it


def _added(info: Any) -> int:
    """`entries-added` of an XINFO STREAM reply (0 for a stream that does not exist yet)."""
    if isinstance(info, Exception) or not info:
        return 0
    return int(info.get("entries-added", info.get(b"entries-added", 0)) or 0)


async def _bucket_figures(redis: Client, tag: str) -> tuple[list[int], float, int, int] | None:
    """One SKU's (or stock bucket's) figures in SkuSample's order, its drain rate, its bucket
    count and total stock; None when not configured."""
    sk = keys.SkuKeys(tag)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(
            sk.sku,
            "stock",
            "available",
            "held",
            "sold",
            "backlog",
            "buckets",
            "total_stock",
            "drain_rate",
        )
        pipe.xinfo_stream(sk.stream)
        pipe.xinfo_stream(sk.events)
        pipe.xlen(sk.dead)
        pipe.xpending(sk.stream, keys.FINALIZER_GROUP)
        pipe.zcard(sk.holds)
        figures, stream, events, dead, pending, holds = await pipe.execute(raise_on_error=False)
    if isinstance(figures, Exception) or figures[0] is None:
        return None
    stock, available, held, sold, backlog = (int(v or 0) for v in figures[:5])
    values = [
        stock,
        available,
        held,
        sold,
        0 if isinstance(holds, Exception) else int(holds),
        backlog,
        0 if isinstance(pending, Exception) else int(pending["pending"]),
        0 if isinstance(dead, Exception) else int(dead),
        _added(stream),
        _added(events),
    ]
    return values, float(figures[7] or 0), int(figures[5] or 1), int(figures[6] or 0)


async def sample(redis: Client) -> Sample:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.MODE, "mode")
        pipe.lindex(keys.MODE_HISTORY, 0)
        pipe.smembers(keys.SKU_REGISTRY)
        pipe.hgetall(keys.RELAY_LAG)
        mode, last, members, relays = await pipe.execute()
    sku_ids = sorted(m.decode() for m in members)
    skus: list[SkuSample] = []
    for sku_id in sku_ids:
        home = await _bucket_figures(redis, sku_id)
        if home is None:
            continue  # registered, not configured: `flashgate audit` reports it
        figures, rate, buckets, total = home
        if buckets > 1:  # a bucketed SKU: every bucket summed, units in transit available
            for tag in keys.bucket_tags(sku_id, buckets)[1:]:
                more = await _bucket_figures(redis, tag)
                if more is not None:
                    figures = [a + b for a, b in zip(figures, more[0], strict=True)]
                    rate += more[1]
            in_transit = total - figures[0]
            figures[0] += in_transit
            figures[1] += in_transit
        skus.append(SkuSample(sku_id, rate, *figures))
    return Sample(
        at=time.monotonic(),
        mode=mode.decode() if mode else "NORMAL",
        last_switch=json.loads(last) if last else None,
        skus=skus,
        relays=relaylag.parse(relays, int(time.time() * 1000)),
    )


async def dead_letters(
    redis: Client, sku_ids: Sequence[str] | None, limit: int
) -> list[tuple[str, ...]]:
    """The newest `limit` dead letters of each SKU (all registered SKUs by default), newest
    first: where they are, which entry they were, the order, the reason, and whose they are
    (`finalizer`: the order stream's, `relay`: an outbound event a relay's target kept
    refusing). Read only."""
    rows: list[tuple[str, ...]] = []
    every = await Layouts(redis).every_bucket(sku_ids)
    for sku_id, buckets in itertools.groupby(every, key=lambda b: b[0]):
        entries: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for _, _, tag in buckets:  # each stock bucket has its own
            sk = keys.SkuKeys(tag)
            for stream, source in ((sk.dead, "finalizer"), (sk.relay_dead, "relay")):
                got: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrevrange(
                    stream, count=limit
                )  # type: ignore[assignment]
                entries += [(dead_id, fields, source) for dead_id, fields in got]
        entries.sort(key=lambda e: id_order(e[0]), reverse=True)
        for dead_id, fields, source in entries[:limit]:
            f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            rows.append(
                (sku_id, dead_id.decode(), f.get("entry_id", "-"), f.get("event", "-"),
                 f.get("order_id", "-"), f.get("payment_id", "-"), f.get("reason", "-"),
                 source)
            )  # fmt: skip
    return rows
