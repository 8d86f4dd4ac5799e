"""What Redis holds about the sale, read for the people on call: the intake mode and its last
switch, each SKU's figures (stock, available, held, sold, holds, backlog, pending, dead letters,
entries in and out, a fair start's draw: its state, pre-queued and decided orders), each relay
group's lag (as its relays last wrote it), and the dead letters themselves. Read only, nothing
written.

`flashgate status`, `flashgate dead`, `GET /metrics` and the admin overview read through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

from redis.exceptions import NoScriptError

from gateway.store import calls, keys, relaylag
from gateway.store.buckets import Layouts
from gateway.store.outcomes import SkuFigures
from gateway.transport.connect import Batch, Client
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.streams import id_order

# one SKU's part of sku_figures.lua's reply, in SkuFigures' order (buckets 0: not configured)
Figures = tuple[int, ...]
_FIELDS = len(SkuFigures._fields)
_BUCKETS = SkuFigures._fields.index("buckets")
_TOTAL_STOCK = SkuFigures._fields.index("total_stock")
_DRAIN_MILLI = SkuFigures._fields.index("drain_rate_milli")
_DRAW = SkuFigures._fields.index("draw_state")
DRAW_STATES = ("none", "pending", "drawing", "done")  # sku_figures.lua's draw_state, by code
T = TypeVar("T")
Tags = Sequence[str]  # a SKU's bucket tags, its own id first
Streams = Literal[0, 1, 2]  # which streams' entries added a pass counts (sku_figures.lua)
PER_CALL = 64  # SKUs per sku_figures.lua call on one server: about half a millisecond of its time


class SkuSample(NamedTuple):
    """A tuple of numbers and strings: the collector stops tracking it once it has seen it
    (10,000 SKUs a pass, kept until the next: never scanned again by a full collection)."""

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
    SKU registry; then `sku_figures.lua` over every stock bucket, `per_call` buckets a call
    (1 on a cluster, where a script's keys share a slot), every call in one write. Each call
    is well under a millisecond of the server's time, and other clients' commands are served
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
        per_call: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.per_call = per_call
        self.max_age_s = max_age_s
        self.clock = clock
        self._script = scripts["sku_figures"]
        self._buckets: dict[str, int] = {}  # sku_id -> bucket count, once seen
        # (tags, streams) -> the script's call: built once, not every pass
        self._calls: dict[tuple[tuple[str, ...], Streams], tuple[Any, ...]] = {}
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
        # The work around the reads is tens of milliseconds at 10,000 SKUs: in threads, so
        # the event loop (and the orders it serves) gets the interpreter back every switch
        # interval (`web.app.SWITCH_INTERVAL_S` in a gateway worker)
        sku_ids, tags, every = await asyncio.to_thread(paused, self._tags, members)
        got = await self._figures(every, streams)
        more = await asyncio.to_thread(paused, self._learn_buckets, sku_ids, tags, got)
        if more:
            got.update(await self._figures(more, streams))
        skus = await asyncio.to_thread(paused, _sku_samples, sku_ids, tags, got)
        return Sample(
            at=self.clock(),
            mode=mode.decode() if mode else "NORMAL",
            last_switch=json.loads(last) if last else None,
            skus=skus,
            relays=relaylag.parse(_pairs(lags), now_ms := int(time.time() * 1000)),
            streams=streams,
            silent=relaylag.parse(_pairs(lags), now_ms, stale=True),
        )

    def _tags(self, members: Iterable[bytes]) -> tuple[list[str], dict[str, Tags], list[str]]:
        """The registered SKU ids, sorted; each one's bucket tags as far as known; all those
        tags in order."""
        sku_ids = sorted(m.decode() for m in members)
        known = self._buckets
        if not known:  # no bucketed SKU seen: one tag each, the SKU's id
            return sku_ids, {s: (s,) for s in sku_ids}, sku_ids
        tags: dict[str, Tags] = {
            s: keys.bucket_tags(s, known[s]) if s in known else (s,) for s in sku_ids
        }
        return sku_ids, tags, [t for ts in tags.values() for t in ts]

    def _learn_buckets(
        self, sku_ids: list[str], tags: dict[str, Tags], got: dict[str, Figures]
    ) -> list[str]:
        """Bucketed SKUs seen for the first time: their bucket count remembered, `tags` made
        whole; the tags of their other buckets returned (not read yet)."""
        more: list[str] = []
        for sku_id in sku_ids:
            home = got.get(sku_id)
            if home and home[_BUCKETS] and home[_BUCKETS] != len(tags[sku_id]):
                self._buckets[sku_id] = home[_BUCKETS]
                tags[sku_id] = keys.bucket_tags(sku_id, home[_BUCKETS])
                more += tags[sku_id][1:]
        return more

    async def _figures(self, tags: list[str], streams: Streams) -> dict[str, Figures]:
        """sku_figures.lua of every bucket tag, `per_call` tags a call, every call in one write
        (plus one after a script flush: EVAL for the calls the server answered NOSCRIPT)."""
        mine = await asyncio.to_thread(paused, self._calls_of, tags, streams)
        replies = await self.reader.execute_many(mine)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            evals = [("EVAL", self._script.source, *mine[i][2:]) for i in again]
            for i, reply in zip(again, await self.reader.execute_many(evals), strict=True):
                replies[i] = reply
        return await asyncio.to_thread(paused, _by_tag, tags, replies)

    def _calls_of(self, tags: list[str], streams: Streams) -> list[tuple[Any, ...]]:
        """Each call (EVALSHA, its numkeys, KEYS and ARGV), `per_call` tags a call: made once,
        kept while the SKUs stay the same."""
        per_call, made, sha = self.per_call, self._calls, self._script.sha
        mine = []
        for i in range(0, len(tags), per_call):
            chunk = tuple(tags[i : i + per_call])
            call = made.get((chunk, streams))
            if call is None:
                ks, args = calls.sku_figures_of(
                    [keys.SkuKeys(t) for t in chunk], group=keys.FINALIZER_GROUP, streams=streams
                )
                call = made[chunk, streams] = ("EVALSHA", sha, len(ks), *ks, *args)
            mine.append(call)
        if len(made) > 4 * len(mine) + 64:  # the SKUs changed: forget the calls of old chunks
            self._calls = {}
        return mine


_pauses = 0  # passes under way that hold the collector off
_pauses_lock = threading.Lock()
_was_enabled = True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector held off while a pass makes its tens of thousands of
    objects (tuples, nearly all of them, which it would untrack, not free): each allocation
    counts toward a collection, and the full ones that follow scan the whole heap, the
    interpreter held meanwhile (5 to 15 ms at 10,000 SKUs, as long a stall for the orders
    served beside). Nested and concurrent passes count: the last one turns the collector back
    on, if it was on before the first."""
    global _pauses, _was_enabled
    with _pauses_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def paused(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` with the collector held off (`collector_paused`): for `asyncio.to_thread`."""
    with collector_paused():
        return work(*args)


def _by_tag(tags: list[str], replies: list[Any]) -> dict[str, Figures]:
    """Each tag's figures (buckets 0: not configured), from the calls' flat lists of integers,
    in tuples: nothing the collector keeps tracking."""
    flat = itertools.chain.from_iterable(_raise_first(replies))
    return dict(zip(tags, zip(*[flat] * _FIELDS, strict=True), strict=True))


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
    sku_ids: list[str], tags: dict[str, Tags], got: dict[str, Figures]
) -> list[SkuSample]:
    samples, make = [], SkuSample._make
    for sku_id in sku_ids:
        home = got.get(sku_id)
        if home and home[_BUCKETS] == 1 and not home[_DRAW]:  # most SKUs: one bucket, no draw
            samples.append(make((sku_id, home[_DRAIN_MILLI] / 1000, *home[:10], *_NO_DRAW)))
        elif (sample := _sku_sample(sku_id, [got.get(t) for t in tags[sku_id]])) is not None:
            samples.append(sample)
    return samples


def _sku_sample(sku_id: str, buckets: list[Figures | None]) -> SkuSample | None:
    """One SKU's sample from its buckets' figures (home first): summed, the units in transit
    between buckets counted as stock and available; None when not configured."""
    home = buckets[0]
    if not home or not home[_BUCKETS]:
        return None  # registered, not configured: `flashgate audit` reports it
    if len(buckets) == 1:
        draw = _draw([home]) if home[_DRAW] else _NO_DRAW
        return SkuSample._make((sku_id, home[_DRAIN_MILLI] / 1000, *home[:10], *draw))
    figures = list(home[:10])
    drain_milli = home[_DRAIN_MILLI]
    for more in buckets[1:]:
        if more and more[_BUCKETS]:
            figures = [a + b for a, b in zip(figures, more[:10], strict=True)]
            drain_milli += more[_DRAIN_MILLI]
    in_transit = home[_TOTAL_STOCK] - figures[0]
    figures[0] += in_transit
    figures[1] += in_transit
    draw = _draw([b for b in buckets if b and b[_BUCKETS]])
    return SkuSample._make((sku_id, drain_milli / 1000, *figures, *draw))


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
