"""`flashgate status`: what the gateway is doing, in the terminal, read from Redis.

The intake mode (with the last switch: when, who, from where) and, per SKU: stock, available,
held, sold; the backlog of orders not yet decided by a finalizer; entries delivered to a
finalizer and not yet acknowledged; dead letters; and two rates over the sampling interval:
entries into the SKU's stream per second (orders and payment confirmations) and final states
out per second (the outbound events). Each sample is one pipeline per SKU; nothing is written.

    flashgate status                 # one table, rates over 1 s
    flashgate status --watch 2       # a table every 2 s until Ctrl-C
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gateway.store import keys
from gateway.transport.connect import Client


@dataclass(frozen=True, slots=True)
class SkuSample:
    sku_id: str
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


def _added(info: Any) -> int:
    """`entries-added` of an XINFO STREAM reply (0 for a stream that does not exist yet)."""
    if isinstance(info, Exception) or not info:
        return 0
    return int(info.get("entries-added", info.get(b"entries-added", 0)) or 0)


async def _bucket_figures(redis: Client, tag: str) -> tuple[list[int], int, int] | None:
    """One SKU's (or stock bucket's) figures in SkuSample's order, its bucket count and total
    stock; None when not configured."""
    sk = keys.SkuKeys(tag)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(
            sk.sku, "stock", "available", "held", "sold", "backlog", "buckets", "total_stock"
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
    return values, int(figures[5] or 1), int(figures[6] or 0)


async def sample(redis: Client) -> Sample:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.MODE, "mode")
        pipe.lindex(keys.MODE_HISTORY, 0)
        pipe.smembers(keys.SKU_REGISTRY)
        mode, last, members = await pipe.execute()
    sku_ids = sorted(m.decode() for m in members)
    skus: list[SkuSample] = []
    for sku_id in sku_ids:
        home = await _bucket_figures(redis, sku_id)
        if home is None:
            continue  # registered, not configured: `flashgate audit` reports it
        figures, buckets, total = home
        if buckets > 1:  # a bucketed SKU: every bucket summed, units in transit available
            for tag in keys.bucket_tags(sku_id, buckets)[1:]:
                more = await _bucket_figures(redis, tag)
                if more is not None:
                    figures = [a + b for a, b in zip(figures, more[0], strict=True)]
            in_transit = total - figures[0]
            figures[0] += in_transit
            figures[1] += in_transit
        skus.append(SkuSample(sku_id, *figures))
    return Sample(
        at=time.monotonic(),
        mode=mode.decode() if mode else "NORMAL",
        last_switch=json.loads(last) if last else None,
        skus=skus,
    )


def text_table(rows: Sequence[Sequence[str]], *, numbers_right: bool = False) -> list[str]:
    """Rows as aligned columns two spaces apart; with `numbers_right`, every column after the
    first is right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if numbers_right and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def render(before: Sample, now: Sample) -> list[str]:
    """The table for `now`, with rates against `before`."""
    seconds = max(now.at - before.at, 1e-9)
    earlier = {s.sku_id: s for s in before.skus}
    switch = ""
    if now.last_switch:
        sw = now.last_switch
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(sw["at"] / 1000))
        switch = f" (switched {sw['from']} -> {sw['to']} at {at}"
        switch += f" by {sw.get('by', '?')} from {sw.get('client') or 'unknown'})"
    lines = [f"mode {now.mode}{switch}"]
    header = ("sku_id", "stock", "available", "held", "sold", "backlog", "pending", "dead",
              "in/s", "out/s")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    totals = [0] * 7
    for s in now.skus:
        prev = earlier.get(s.sku_id, s)
        rate_in = (s.entries_in - prev.entries_in) / seconds
        rate_out = (s.entries_out - prev.entries_out) / seconds
        figures = (s.stock, s.available, s.held, s.sold, s.backlog, s.pending, s.dead)
        totals = [t + f for t, f in zip(totals, figures, strict=True)]
        rows.append((s.sku_id, *map(str, figures), f"{rate_in:.1f}", f"{rate_out:.1f}"))
    lines += text_table(rows, numbers_right=True)
    lines.append(
        f"{len(now.skus)} SKU(s): stock {totals[0]}, available {totals[1]}, held {totals[2]}, "
        f"sold {totals[3]}, backlog {totals[4]}, pending {totals[5]}, dead letters {totals[6]}"
    )
    return lines


async def run(redis: Client, *, watch_s: float, count: int | None, out: TextIO) -> int:
    """Print the table once (rates over 1 s) or every `watch_s` seconds, `count` times."""
    interval = watch_s if watch_s > 0 else 1.0
    before = await sample(redis)
    shown = 0
    while True:
        await asyncio.sleep(interval)
        now = await sample(redis)
        if shown:
            print(file=out)
        print(f"-- {time.strftime('%H:%M:%S')}", file=out)
        print("\n".join(render(before, now)), file=out, flush=True)
        shown += 1
        if watch_s <= 0 or (count is not None and shown >= count):
            return 0
        before = now


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


DEAD_HEADER = ("sku_id", "dead_id", "entry_id", "event", "order_id", "payment_id", "reason")


async def dead_letters(
    redis: Client, sku_ids: Sequence[str] | None, limit: int
) -> list[tuple[str, ...]]:
    """The newest `limit` dead letters of each SKU (all registered SKUs by default), newest
    first: where they are, which entry they were, the order, the reason. Read only."""
    if sku_ids is None:
        members: set[bytes] = await redis.smembers(keys.SKU_REGISTRY)  # type: ignore[assignment]
        sku_ids = sorted(m.decode() for m in members)
    rows: list[tuple[str, ...]] = []
    for sku_id in sku_ids:
        buckets = int(await redis.hget(keys.SkuKeys(sku_id).sku, "buckets") or 1)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for tag in keys.bucket_tags(sku_id, buckets):  # each stock bucket has its own
            entries += await redis.xrevrange(keys.SkuKeys(tag).dead, count=limit)  # type: ignore[arg-type]
        entries.sort(key=lambda e: _entry_order(e[0]), reverse=True)
        for dead_id, fields in entries[:limit]:
            f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            rows.append(
                (sku_id, dead_id.decode(), f.get("entry_id", "-"), f.get("event", "-"),
                 f.get("order_id", "-"), f.get("payment_id", "-"), f.get("reason", "-"))
            )  # fmt: skip
    return rows
