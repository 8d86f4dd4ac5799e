"""Relay: every SKU bucket's events stream, delivered to one target through one consumer group.

The group is the target's (`relay:<kind>:<hash of its URL without credentials>`), so relays
side by side share the work and a second target gets every event too. The streams come from
the SKU registry and each SKU's bucket layout, re-read about once a second, so a SKU created
while the relay runs is found. Each stream is read by `relay_read.lua`: it claims entries left
idle by a dead relay, and while another relay still holds entries of the stream it hands out
nothing, so one relay at a time delivers a stream, in commit order. Within a stream events go
one after the other; streams go concurrently (bounded), so a slow receiver holds back only the
streams it is slow on. An entry is acknowledged only once the target confirmed it.

A refusal uses up one of `relay_max_attempts`; then the entry goes to the relay's dead letters
with the reason, acknowledged in the same step (`relay_dead.lua`). An unreachable target uses
up none: backoff (exponential, jittered) capped at 30 s, and the relay keeps trying. While it
waits, and while a slow batch goes out, the relay keeps its held entries from looking idle
(every third of the claim idle time), so no other relay claims them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ResponseError

from gateway.settings import Settings
from gateway.store import calls, keys, relaylag
from gateway.store.buckets import Layouts
from gateway.store.outcomes import RelayDead, RelayRead
from gateway.telemetry.metrics import RELAY_DEAD, RELAY_DELIVERED, RELAY_RETRIES
from gateway.transport.connect import Client
from gateway.transport.replies import REDIS_FAILURES, text
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import consumer_name
from gateway.workers.relay.events import Event, event_id, from_entry
from gateway.workers.relay.lag import Lag, measure
from gateway.workers.relay.target import Refused, Target, Unreachable
from gateway.workers.trim import trim_stream

log = logging.getLogger("flashgate")

Entry = tuple[bytes, dict[bytes, bytes] | None]
STREAMS_REFRESH_S = 1.0  # how soon a new SKU's streams are read
TRIM_EVERY_S = 5.0
LAG_EVERY_S = 1.0  # how often the lag is measured and written for /metrics and the console
BACKOFF_S = 0.5  # the first retry's delay, doubled at each further one
BACKOFF_CAP_S = 30.0
IDLE_POLL_S = (0.05, 1.0)  # an idle stream is read again after 50 ms, doubling up to 1 s
CONCURRENCY = 16  # streams delivering at once


def group_for(kind: str, url: str) -> str:
    """The target's consumer group: its kind and a short hash of its URL without credentials
    (a changed password keeps the group, another host or path gets its own)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return f"relay:{kind}:{hashlib.sha256(clean.encode()).hexdigest()[:8]}"


@dataclass(slots=True)
class Stream:
    """One SKU bucket's events stream."""

    sku: keys.SkuKeys  # the bucket's keys
    bucket: int  # its index among the SKU's buckets (0: the SKU itself)
    poll_s: float = 0.0  # how long its loop waits before reading it again when idle

    @property
    def key(self) -> str:
        return self.sku.events


class Relay:
    def __init__(
        self,
        redis: Client,
        scripts: ScriptRegistry,
        settings: Settings,
        target: Target,
        *,
        group: str | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        backoff_s: float = BACKOFF_S,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.redis = redis
        self.target = target
        self.group = group or group_for(target.name, settings.relay_url or "")
        self.consumer = name or consumer_name()
        self.count = settings.relay_prefetch
        self.max_attempts = settings.relay_max_attempts
        self.claim_idle_ms = settings.finalizer_claim_idle_ms
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.backoff_s = backoff_s
        self.layouts = Layouts(redis)
        self.streams: dict[str, Stream] = {}
        self.delivered = 0
        self.dead = 0
        self.retries = 0
        self.refusals = 0  # answers that did not take an event (each used up an attempt)
        self.lag = Lag(0, 0)
        self._read = scripts["relay_read"]
        self._dead = scripts["relay_dead"]
        self._limit = asyncio.Semaphore(concurrency)
        self._stop = asyncio.Event()
        self._streams_read_at = -1e9
        self._trimmed_at = -1e9
        self._measured_at = -1e9

    # -- the streams ---------------------------------------------------------------------------

    async def refresh_streams(self) -> list[Stream]:
        """Join the group on every bucket's events stream of every SKU; returns the new ones."""
        found = []
        for _, bucket, tag in await self.layouts.every_bucket():
            sk = keys.SkuKeys(tag)
            if sk.events not in self.streams:
                await self._join(sk.events)
                self.streams[sk.events] = stream = Stream(sk, bucket)
                found.append(stream)
        self._streams_read_at = self.clock()
        return found

    async def _join(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- one stream's batch ----------------------------------------------------------------------

    async def step(self, stream: Stream) -> int:
        """Read one batch of the stream (claiming what a dead relay left) and deliver it in
        order. Returns how many entries were handled (confirmed or dead-lettered)."""
        call = calls.relay_read(
            stream.key,
            group=self.group,
            consumer=self.consumer,
            count=self.count,
            min_idle_ms=self.claim_idle_ms,
        )
        try:
            code, entries = await self._read(self.redis, *call)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._join(stream.key)  # the stream was deleted: join it again
            return 0
        if RelayRead(code) is RelayRead.BUSY:
            return 0
        batch: list[Entry] = [(e[0], _fields(e[1])) for e in entries]
        ids = [entry_id for entry_id, _ in batch]
        every, touched = self._touch_every_s(), self.clock()
        for i, entry in enumerate(batch):
            if self.clock() - touched >= every:  # a slow batch: keep the rest from looking idle
                await self._touch(stream, ids[i:])
                touched = self.clock()
            await self.handle(stream, entry, ids[i:])
        return len(batch)

    async def handle(self, stream: Stream, entry: Entry, held: list[bytes]) -> None:
        """Deliver one entry; `held`: it and the batch's later entries, still pending here."""
        entry_id, fields = entry
        if fields is None:  # deleted from the stream while pending: nothing to deliver
            await self.redis.xack(stream.key, self.group, entry_id)
            return
        try:
            event = from_entry(stream.sku.sku_id, stream.bucket, entry_id, fields)
        except ValueError as exc:
            await self.dead_letter(stream, entry, f"not an event: {exc}")
            return
        await self.deliver(stream, entry, event, held)

    async def deliver(self, stream: Stream, entry: Entry, event: Event, held: list[bytes]) -> None:
        """Deliver until the target confirms (then acknowledge) or has refused
        `max_attempts` times (then dead-letter)."""
        refusals = misses = 0
        while True:
            try:
                await self.target.deliver(event)
            except Refused as exc:
                refusals += 1
                self.refusals += 1
                if refusals >= self.max_attempts:
                    await self.dead_letter(stream, entry, f"refused {refusals} times: {exc}")
                    return
                delay = self.backoff(refusals)
                log.warning("relay: event %s refused (%d): %s", event.id, refusals, exc)
            except Unreachable as exc:
                misses += 1
                delay = self.backoff(misses)
                log.warning("relay: %s unreachable: %s", self.target.name, exc)
            else:
                await self.redis.xack(stream.key, self.group, entry[0])
                self.delivered += 1
                RELAY_DELIVERED.labels(self.target.name, event.type).inc()
                return
            self.retries += 1
            RELAY_RETRIES.inc()
            await self._wait(stream, held, delay)

    def backoff(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1 = the first): exponential, capped at 30 s,
        with jitter (between half and all of it)."""
        delay: float = min(BACKOFF_CAP_S, self.backoff_s * 2.0 ** min(attempt - 1, 32))
        return delay * (0.5 + self.rng.random() / 2)

    def _touch_every_s(self) -> float:
        """How often held entries are touched: a third of the claim idle time."""
        return max(self.claim_idle_ms / 3000, 0.01)

    async def _touch(self, stream: Stream, held: list[Any]) -> None:
        """Reset the idle time of the entries held here, so no other relay takes them."""
        await self.redis.xclaim(stream.key, self.group, self.consumer, 0, held, justid=True)

    async def _wait(self, stream: Stream, held: list[Any], delay: float) -> None:
        """Sleep `delay` seconds, touching the entries held here every third of the claim
        idle time, so no other relay takes them while this one waits."""
        every = self._touch_every_s()
        while delay > 0:
            await self.sleep(min(delay, every))
            delay -= every
            await self._touch(stream, held)

    async def dead_letter(self, stream: Stream, entry: Entry, reason: str) -> None:
        entry_id, fields = entry
        call = calls.relay_dead(
            stream.sku,
            group=self.group,
            entry_id=entry_id,
            event_id=event_id(stream.sku.sku_id, stream.bucket, text(entry_id)),
            reason=reason,
            fields=[x for pair in (fields or {}).items() for x in pair],
        )
        if RelayDead(int((await self._dead(self.redis, *call))[0])) is RelayDead.DEAD_LETTERED:
            self.dead += 1
            RELAY_DEAD.inc()
            log.error("relay: entry %s of %s dead-lettered: %s", text(entry_id), stream.key, reason)

    # -- rounds --------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """One round over every stream (new SKUs looked for when due, every stream read once,
        concurrently and bounded), then a trim when due. Returns how many entries were handled."""
        if self.clock() - self._streams_read_at >= STREAMS_REFRESH_S:
            await self.refresh_streams()

        async def bounded(stream: Stream) -> int:
            async with self._limit:
                return await self.step(stream)

        handled = sum(await asyncio.gather(*(bounded(s) for s in list(self.streams.values()))))
        await self._housekeep()
        return handled

    async def _housekeep(self) -> None:
        """The lag measured and the streams trimmed, each when due."""
        if self.clock() - self._measured_at >= LAG_EVERY_S:
            await self.measure_lag()
        if self.clock() - self._trimmed_at >= TRIM_EVERY_S:
            await self.trim()

    async def measure_lag(self) -> Lag:
        """Measure the group's lag over every stream (one pipelined pass) and write it to
        `fg:relay-lag` for /metrics and the console."""
        self.lag = await measure(self.redis, list(self.streams), self.group)
        lag, at_ms = self.lag, int(time.time() * 1000)
        figures = relaylag.RelayLag(self.group, self.target.name, lag.events, lag.oldest_ms, at_ms)
        await relaylag.write(self.redis, figures)
        self._measured_at = self.clock()
        return self.lag

    async def drain(self) -> int:
        """Rounds until one handles nothing; returns how many entries were handled."""
        total = 0
        while handled := await self.run_once():
            total += handled
        return total

    async def trim(self) -> int:
        """Drop what every group of each stream has confirmed; returns how many entries went."""
        dropped = 0
        for stream in list(self.streams):
            dropped += await trim_stream(self.redis, stream)
        self._trimmed_at = self.clock()
        return dropped

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Deliver until `stop()`: one task per stream, new streams joined and the lag
        measured about once a second, trimming every few seconds. Redis outages and a target
        out of reach (at start too: a broker not up yet) are waited out; a target that refuses
        what it must declare (a queue declared otherwise, wrong credentials) stops the relay
        with its error."""
        log.info("relay %s started (group %s)", self.consumer, self.group)
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            await self._start_target()
            while not self._stop.is_set():
                await self._supervise(tasks)
                await _wait_for(self._stop, STREAMS_REFRESH_S)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self.target.close()
        log.info(
            "relay %s stopped (%d delivered, %d dead)", self.consumer, self.delivered, self.dead
        )

    async def _start_target(self) -> None:
        """Start the target, trying again with the delivery backoff while it is out of reach
        (until `stop()`)."""
        misses = 0
        while not self._stop.is_set():
            try:
                await self.target.start()
                return
            except Unreachable as exc:
                misses += 1
                delay = self.backoff(misses)
                log.warning("relay: %s unreachable at start (%s); again in %.1f s",
                            self.target.name, exc, delay)  # fmt: skip
                await _wait_for(self._stop, delay)

    async def _supervise(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        try:
            await self.refresh_streams()
            await self._housekeep()
        except REDIS_FAILURES as exc:
            log.warning("relay: Redis unavailable (%s); retrying", exc)
        for key, stream in self.streams.items():
            if key not in tasks or tasks[key].done():
                tasks[key] = asyncio.create_task(self._stream_loop(stream))

    async def _stream_loop(self, stream: Stream) -> None:
        low, high = IDLE_POLL_S
        while not self._stop.is_set():
            try:
                async with self._limit:
                    handled = await self.step(stream)
            except REDIS_FAILURES as exc:
                log.warning("relay: Redis unavailable on %s (%s); retrying", stream.key, exc)
                handled, stream.poll_s = 0, high
            stream.poll_s = low if handled else min(high, max(low, stream.poll_s * 2))
            if not handled:
                await _wait_for(self._stop, stream.poll_s)


def _fields(raw: Any) -> dict[bytes, bytes] | None:
    """An entry's fields as a script returns them (a flat list; false for a deleted entry)."""
    if not raw:
        return None
    return dict(zip(raw[::2], raw[1::2], strict=True))


async def _wait_for(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
