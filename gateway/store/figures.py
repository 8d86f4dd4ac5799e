"""What Redis holds about the sale, read for the people on call: the intake mode and its last
switch, each SKU's figures (stock, available, held, sold, holds, backlog, pending, dead letters,
entries in and out, a fair start's draw: its state, pre-queued and decided orders), each relay
group's lag (as its relays last wrote it), and the dead letters themselves. Read only, nothing
written.

`flashgate status`, `flashgate dead`, `GET /metrics` and the admin overview read through here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

from redis.exceptions import NoScriptError

from gateway.store import calls, keys, relaylag
from gateway.store.buckets import Layouts
from gateway.store.outcomes import SkuFigures
from gateway.transport.connect import Batch, Client
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.streams import id_order

Figures = list[int]  # sku_figures.lua's reply, in SkuFigures' order (empty: not configured)
_BUCKETS = SkuFigures._fields.index("buckets")
_TOTAL_STOCK = SkuFigures._fields.index("total_stock")
_DRAIN_MILLI = SkuFigures._fields.index("drain_rate_milli")
_DRAW = SkuFigures._fields.index("draw_state")
DRAW_STATES = ("none", "pending", "drawing", "done")  # sku_figures.lua's draw_state, by code
Streams = Literal[0, 1, 2]  # which streams' entries added a pass counts (sku_figures.lua)


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
    _: KW_ONLY
    draw: str = "none"  # its fair start's draw: none, pending, drawing or done
    prequeued: int = 0  # orders in the draw's pre-queue (fixed once the draw opens)
    drawn: int = 0  # pre-queued orders the draw decided so far (its cursor)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic seconds
    mode: str
    last_switch: dict[str, Any] | None
    skus: list[SkuSample]
    relays: list[relaylag.RelayLag]  # each relay group's lag, as its relays last wrote it
    streams: Streams = 2  # which entries were counted (sku_figures.lua)
    silent: list[relaylag.RelayLag] = field(default_factory=list)  # groups no relay reports for


class Sampler:
    """Reads `Sample`s: at most one pass over Redis per `max_age_s` (a scrape, a console view
    or a `status` inside it gets the last one), and one at a time (callers that come while a
    pass runs wait for it).

    A pass is two round trips, whatever the number of SKUs: the mode, its last switch and the
    SKU registry; then `sku_figures.lua` once per stock bucket, every call in one write. Each
    call is a few microseconds of the server's time, and other clients' commands are served
    between them, so the order path never waits for the whole pass. A SKU's bucket count is
    fixed when it is created and remembered: a bucketed SKU seen for the first time costs one
    more round trip for its other buckets, once.
    """

    def __init__(
        self,
        reader: Batch,
        scripts: ScriptRegistry,
        *,
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.max_age_s = max_age_s
        self.clock = clock
        self._script = scripts["sku_figures"]
        self._buckets: dict[str, int] = {}  # sku_id -> bucket count, once seen
        # (tag, streams) -> the script's numkeys, KEYS and ARGV: built once, not every pass
        self._calls: dict[tuple[str, Streams], tuple[Any, ...]] = {}
        self._last: Sample | None = None
        self._reading: dict[Streams, asyncio.Task[Sample]] = {}  # the pass under way, by streams

    async def sample(self, *, streams: Streams = 0) -> Sample:
        """The last sample if young enough, else a new one. `streams`: which entries added
        are counted, the costliest figures (sku_figures.lua): 0 none (/metrics shows none),
        1 the order streams' (`entries_in`, the console's intake rate), 2 the events
        streams' too (`entries_out`, `flashgate status`)."""
        last = self._last
        if last is not None and self.clock() - last.at < self.max_age_s:
            if last.streams >= streams:
                return last
        reading = self._reading.get(streams)
        if reading is None:
            reading = self._reading[streams] = asyncio.ensure_future(self._read(streams))
            reading.add_done_callback(lambda task: self._done(streams, task))
        # shared: one caller that gives up must not cancel the pass the others wait for
        return await asyncio.shield(reading)

    def _done(self, streams: Streams, task: asyncio.Task[Sample]) -> None:
        del self._reading[streams]
        if not task.cancelled() and task.exception() is None:
            self._last = task.result()

    async def _read(self, streams: Streams) -> Sample:
        head = await self.reader.execute_many(
            [("HGET", keys.MODE, "mode"), ("LINDEX", keys.MODE_HISTORY, 0),
             ("SMEMBERS", keys.SKU_REGISTRY), ("HGETALL", keys.RELAY_LAG)]
        )  # fmt: skip
        mode, last, members, lags = _raise_first(head)
        sku_ids = sorted(m.decode() for m in members)
        known = self._buckets
        tags = {s: keys.bucket_tags(s, known[s]) if s in known else [s] for s in sku_ids}
        got = await self._figures([t for ts in tags.values() for t in ts], streams)
        more = {}  # bucketed SKUs seen for the first time: their other buckets
        for sku_id in sku_ids:
            home = got.get(sku_id)
            if home and home[_BUCKETS] != len(tags[sku_id]):
                self._buckets[sku_id] = home[_BUCKETS]
                tags[sku_id] = keys.bucket_tags(sku_id, home[_BUCKETS])
                more[sku_id] = tags[sku_id][1:]
        if more:
            got.update(await self._figures([t for ts in more.values() for t in ts], streams))
        # tens of milliseconds at 10,000 SKUs: in a thread, so the event loop (and the orders
        # it serves) gets the interpreter back every switch interval (5 ms)
        skus = await asyncio.to_thread(_sku_samples, sku_ids, tags, got)
        return Sample(
            at=self.clock(),
            mode=mode.decode() if mode else "NORMAL",
            last_switch=json.loads(last) if last else None,
            skus=skus,
            relays=relaylag.parse(_pairs(lags), now_ms := int(time.time() * 1000)),
            streams=streams,
            silent=relaylag.parse(_pairs(lags), now_ms, stale=True),
        )

    async def _figures(self, tags: list[str], streams: Streams) -> dict[str, Figures]:
        """sku_figures.lua of every bucket tag, in one write (plus one after a script flush:
        EVAL for the calls the server answered NOSCRIPT)."""
        script = self._script
        made = self._calls
        for tag in tags:
            if (tag, streams) not in made:
                ks, args = calls.sku_figures(
                    keys.SkuKeys(tag), group=keys.FINALIZER_GROUP, streams=streams
                )
                made[tag, streams] = (len(ks), *ks, *args)
        replies = await self.reader.execute_many(
            [("EVALSHA", script.sha, *made[t, streams]) for t in tags]
        )
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            evals = [("EVAL", script.source, *made[tags[i], streams]) for i in again]
            for i, reply in zip(again, await self.reader.execute_many(evals), strict=True):
                replies[i] = reply
        # the replies as they are (lists of integers): 10,000 SKUs a pass
        return dict(zip(tags, _raise_first(replies), strict=True))


def _pairs(flat: Any) -> dict[Any, Any]:
    """An HGETALL reply as a dict (a flat list of fields and values on the wire)."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _sku_samples(
    sku_ids: list[str], tags: dict[str, list[str]], got: dict[str, Figures]
) -> list[SkuSample]:
    return [
        sample
        for sku_id in sku_ids
        if (sample := _sku_sample(sku_id, [got.get(t) for t in tags[sku_id]])) is not None
    ]


def _sku_sample(sku_id: str, buckets: list[Figures | None]) -> SkuSample | None:
    """One SKU's sample from its buckets' figures (home first): summed, the units in transit
    between buckets counted as stock and available; None when not configured."""
    home = buckets[0]
    if not home:
        return None  # registered, not configured: `flashgate audit` reports it
    if len(buckets) == 1:
        state, prequeued, drawn = _draw([home]) if home[_DRAW] else _NO_DRAW
        return SkuSample(
            sku_id, home[_DRAIN_MILLI] / 1000, *home[:10],
            draw=state, prequeued=prequeued, drawn=drawn,
        )  # fmt: skip
    figures = list(home[:10])
    drain_milli = home[_DRAIN_MILLI]
    for more in buckets[1:]:
        if more:
            figures = [a + b for a, b in zip(figures, more[:10], strict=True)]
            drain_milli += more[_DRAIN_MILLI]
    in_transit = home[_TOTAL_STOCK] - figures[0]
    figures[0] += in_transit
    figures[1] += in_transit
    state, prequeued, drawn = _draw([b for b in buckets if b])
    return SkuSample(
        sku_id, drain_milli / 1000, *figures, draw=state, prequeued=prequeued, drawn=drawn
    )


_NO_DRAW = ("none", 0, 0)


def _draw(buckets: list[Figures]) -> tuple[str, int, int]:
    """(state, pre-queued, drawn) of a SKU's draw over its buckets (each bucket draws its own
    pre-queue): the state of the bucket furthest behind, the counts summed."""
    states = [b[_DRAW] for b in buckets if b[_DRAW]]
    if not states:
        return _NO_DRAW
    prequeued = sum(b[_DRAW + 1] for b in buckets)
    return DRAW_STATES[min(states)], prequeued, sum(b[_DRAW + 2] for b in buckets)


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
