"""Finalizer: drains every SKU's order stream through one consumer group.

Each entry is applied by `finalize.lua`, which stores the effect and acknowledges the entry in
one atomic step: an entry is never acknowledged without its effect, and a redelivered entry
finds its effect already stored, so processing is idempotent. Entries left pending by a dead
finalizer are claimed with XAUTOCLAIM once idle for `claim_idle_ms`; an entry that fails
`max_deliveries` times moves to the SKU's dead-letter stream with its reason. Acknowledged
entries are trimmed below what every consumer group confirmed (`workers.trim`, as the relay
trims the events streams), never an unprocessed one.

A SKU with a fair start waits for its draw: its stream is not read while the draw is not done
(an entry read anyway is left pending, `WAITING`); at its start the finalizer runs the draw
(`workers/draw.py`), then reads the stream again from its own pending entries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from gateway.errors import BackendUnavailable
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.buckets import Layouts, Mover
from gateway.store.draws import Draws
from gateway.store.outcomes import Finalized, FinalizeResult
from gateway.store.sending import Sender
from gateway.telemetry.queueing import ETA_ERROR, QUEUE_WAIT
from gateway.transport.connect import Client, create_script_client
from gateway.transport.durable import acked
from gateway.transport.replies import REDIS_FAILURES, text
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer, DrawWatch
from gateway.workers.trim import trim_stream

log = logging.getLogger("flashgate")

Entry = tuple[bytes, dict[bytes, bytes]]
STREAMS_REFRESH_S = 1.0  # how soon a new SKU's stream is read
TRIM_EVERY_S = 5.0
REFILL_LOOKS = 10  # a QUEUED order of a bucketed SKU: refills tried while stock is in flight
CLAIM_EVERY_S = 1.0  # cluster mode: how often entries left by a dead finalizer are looked for
# Error replies that say nothing about the entry: its slot is moving (ASK and MOVED that
# redis-py did not follow, TRYAGAIN), or the cluster or a primary is down or read-only.
CLUSTER_MOMENTS = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)
# Error replies of a server that cannot write now (out of memory, no replica, a failed save,
# a long script, loading): nothing about the entry either.
SERVER_STATES = ("OOM", "NOREPLICAS", "MISCONF", "BUSY", "LOADING", "MASTERDOWN")
CLUSTER_POLL_MS = 50  # cluster mode: how long an idle finalizer waits before reading again


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Finalizer:
    def __init__(
        self,
        redis: Client,
        scripts: ScriptRegistry,
        settings: Settings,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.group = keys.FINALIZER_GROUP
        self.consumer = name or consumer_name()
        self.cluster = settings.redis_cluster
        self.count = settings.finalizer_batch
        self.block_ms = settings.finalizer_block_ms
        self.claim_idle_ms = settings.finalizer_claim_idle_ms
        self.max_deliveries = settings.finalizer_max_deliveries
        self.clock = clock
        self._finalize = scripts["finalize"]
        self._dead = scripts["dead_letter"]
        self._hold_ttl_ms = settings.hold_ttl_s * 1000
        self._streams: dict[str, str] = {}  # stream key -> its bucket's tag (the sku_id)
        self.drawer = Drawer(Draws(Sender(redis, settings), scripts), settings)
        self.draws = DrawWatch(self.drawer)  # streams waiting for their SKU's draw
        self.layouts = Layouts(redis)
        # Stock moved between buckets is as durable as an order (WAITAOF when asked): on the
        # order path's kind of client, so the wait reaches the node that ran the write.
        self._fast = create_script_client(settings) if acked(settings, redis) is not redis else None
        self.mover = Mover(acked(settings, self._fast or redis), scripts)
        self._streams_read_at = -1e9
        self._trimmed_at = -1e9
        self._claimed_at = -1e9
        self.claim_every_s = CLAIM_EVERY_S if settings.redis_cluster else 0.0
        self._claimed = False  # the last look for idle entries found some
        self.applied = 0

    async def refresh_streams(self) -> None:
        """Join the group on every configured SKU's streams (one per stock bucket; created
        from its first entry)."""
        for sku_id in await self.redis.smembers(keys.SKU_REGISTRY):
            for tag in await self.layouts.all_tags(text(sku_id)):
                stream = keys.SkuKeys(tag).stream
                if stream in self._streams:
                    continue
                try:
                    await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._streams[stream] = tag
        await self.draws.read(self.redis, self._streams)
        self._streams_read_at = self.clock()

    async def _run_draws(self) -> int:
        """Run the draws that are due; a stream whose draw is done is read again from this
        finalizer's own pending entries. Returns how many entries were handled."""
        handled = 0
        for stream in await self.draws.run_due(self._streams):
            handled += await self._read_own_pending(stream)
        return handled

    async def _read_own_pending(self, stream: str) -> int:
        """Apply the entries of `stream` this finalizer read and left pending (WAITING)."""
        handled = 0
        while True:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {stream: "0"}, count=self.count
            )
            entries = [e for _, batch in _stream_entries(reply) for e in batch if e[1]]
            done = 0
            for entry in entries:
                done += await self.apply(stream, self._streams[stream], entry)
            handled += done
            if not done:
                return handled

    async def step(self, *, block: bool = True) -> int:
        """One round: reclaim stale entries, then read and apply new ones. Returns how many
        entries were handled."""
        if self.clock() - self._streams_read_at > STREAMS_REFRESH_S:
            await self.refresh_streams()
        if not self._streams:
            if block:
                await asyncio.sleep(self.block_ms / 1000)
            return 0
        handled = await self._run_draws() if self.draws.held or self.draws.released else 0
        # Reclaiming looks for entries idle for claim_idle_ms. On a cluster an idle round
        # comes every 50 ms: once a second is soon enough there, unless the last look found
        # some (there may be more).
        if self._claimed or self.clock() - self._claimed_at >= self.claim_every_s:
            self._claimed_at = self.clock()
            claimed = 0
            for stream, sku in self._readable():
                for entry in await self._claim(stream):
                    claimed += 1
                    handled += await self.apply(stream, sku, entry)
            self._claimed = claimed > 0
        handled += await self._read_new(block and not handled)
        if self.clock() - self._trimmed_at > TRIM_EVERY_S:
            await self.trim()
        return handled

    async def _read_new(self, block: bool) -> int:
        """Read and apply new entries. One server: one XREADGROUP over every stream, blocking
        until one has entries. A cluster refuses a read over streams of different slots: each
        stream is read on its own without blocking, and an idle round sleeps a short poll."""
        handled = 0
        if not self.cluster:
            readable: dict[Any, Any] = {stream: ">" for stream, _ in self._readable()}
            if not readable:  # every SKU waits for its draw
                if block:
                    await asyncio.sleep(self.draws.block_ms(self.block_ms) / 1000)
                return 0
            reply = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                readable,
                count=self.count,
                block=self.draws.block_ms(self.block_ms) if block else None,
            )
            for stream_name, entries in _stream_entries(reply):
                stream = text(stream_name)
                for entry in entries:
                    handled += await self.apply(stream, self._streams[stream], entry)
            return handled
        for stream, sku in self._readable():
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {stream: ">"}, count=self.count
            )
            for _, entries in _stream_entries(reply):
                for entry in entries:
                    handled += await self.apply(stream, sku, entry)
        if block and not handled:
            await asyncio.sleep(min(self.block_ms, CLUSTER_POLL_MS) / 1000)
        return handled

    def _readable(self) -> list[tuple[str, str]]:
        """(stream, its bucket's tag) of every stream not waiting for a draw."""
        held = self.draws.held
        return [(s, sku) for s, sku in self._streams.items() if s not in held]

    async def _claim(self, stream: str) -> list[Entry]:
        reply = await self.redis.xautoclaim(
            stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=self.count
        )
        return [e for e in reply[1] if e is not None and e[1] is not None]

    async def apply(self, stream: str, sku_id: str, entry: Entry) -> int:
        """Apply one entry of the stream of `sku_id` (a stock bucket's tag for a bucketed SKU);
        1 when handled (applied, duplicate or dead-lettered), 0 when left pending for a
        retry."""
        entry_id, fields = entry
        event = fields.get(b"event", b"").decode()
        order_id = fields.get(b"order_id", b"").decode()
        payment_id = fields.get(b"payment_id", b"").decode()
        parts = keys.split_order_id(order_id)
        if event not in ("created", "paid") or parts is None or parts[1] != sku_id:
            await self._dead_letter(stream, sku_id, entry, "malformed entry")
            return 1
        sk = keys.SkuKeys(sku_id)
        if event == "created" and (self.layouts.known(sk.sku_id) or 1) > 1:
            await self._refill_for(sk, order_id)
        call = calls.finalize(
            sk,
            stream,
            group=self.group,
            entry_id=entry_id,
            event="paid" if event == "paid" else "created",
            order_id=order_id,
            payment_id=payment_id,
            hold_ttl_ms=self._hold_ttl_ms,
            now_ms=None,
        )
        try:
            done = Finalized.of(await self._finalize(self.redis, *call))
        except CLUSTER_MOMENTS:
            raise  # a slot moving or a failover: waited out like an outage, not held against it
        except ResponseError as exc:  # the script refused: this entry's fault, not Redis's
            if str(exc).startswith(SERVER_STATES):
                raise  # ... unless the server says it cannot write now: waited out

            return await self._failed(stream, sku_id, entry, str(exc))
        if done.code is FinalizeResult.WAITING:  # left pending until the SKU's draw is done
            self.draws.wait(stream)
            return 0
        self.applied += 1
        if done.waited_ms is not None:  # a QUEUED order left the queue
            QUEUE_WAIT.observe(done.waited_ms / 1000)
            if done.eta_ms is not None:
                ETA_ERROR.observe((done.eta_ms - done.waited_ms) / 1000)
        if done.code is FinalizeResult.APPLIED and done.status == "PAID_AFTER_EXPIRY":
            # A late payment may have released a hold: sold-out memos must look again.
            await self.redis.publish(keys.NOTICES, keys.stock_notice(sk.sku_id))
        return 1

    async def _refill_for(self, sk: keys.SkuKeys, order_id: str) -> None:
        """A QUEUED order of a bucketed SKU is decided with its bucket's stock: move stock in
        from the other buckets first when the bucket is short, so it is never rejected while
        another bucket has what it needs."""
        status, quantity = await self.redis.hmget(sk.order(order_id), "status", "quantity")
        if status != b"QUEUED" or quantity is None:
            return
        available = int(await self.redis.hget(sk.sku, "available") or 0)
        if available < int(quantity):
            count = self.layouts.known(sk.sku_id) or 1
            tags = self.layouts.tags(sk.sku_id, count)
            for _ in range(REFILL_LOOKS):  # -1: stock still moving; it settles within moments
                moved = await self.mover.refill(
                    tags, tags.index(sk.bucket_tag), int(quantity) - available
                )
                if moved >= 0:
                    break
                await asyncio.sleep(0.05)

    async def _failed(self, stream: str, sku_id: str, entry: Entry, reason: str) -> int:
        info = await self.redis.xpending_range(
            stream, self.group, min=entry[0], max=entry[0], count=1
        )
        if not info:
            return 1  # no longer pending: another finalizer claimed and applied it
        deliveries = int(info[0]["times_delivered"])
        log.warning("entry %s of %s failed (delivery %d): %s", entry[0], stream, deliveries, reason)
        if deliveries >= self.max_deliveries:
            await self._dead_letter(stream, sku_id, entry, reason)
            return 1
        return 0

    async def _dead_letter(self, stream: str, sku_id: str, entry: Entry, reason: str) -> None:
        entry_id, fields = entry
        order_id: str | None = fields.get(b"order_id", b"").decode(errors="replace")
        parts = keys.split_order_id(order_id or "")
        if fields.get(b"event") != b"created" or parts is None or parts[1] != sku_id:
            order_id = None  # no order of this stream's to take out of the backlog
        call = calls.dead_letter(
            keys.SkuKeys(sku_id),
            stream,
            order_id,
            group=self.group,
            entry_id=entry_id,
            reason=reason,
            fields=[x for pair in fields.items() for x in pair],
        )
        await self._dead(self.redis, *call)
        log.error("entry %s of %s dead-lettered: %s", entry_id, stream, reason)

    async def trim(self) -> int:
        """Drop what every group of each order stream has confirmed (`workers.trim`): below
        the oldest pending entry, or with none pending, up to the last delivered one. Returns
        how many entries went."""
        dropped = 0
        for stream in self._streams:
            dropped += await trim_stream(self.redis, stream)
        self._trimmed_at = self.clock()
        return dropped

    async def aclose(self) -> None:
        """Close the client of durable stock moves, if one was made."""
        if self._fast is not None:
            await self._fast.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until `stop` is set; Redis outages are waited out."""
        log.info("finalizer %s started", self.consumer)
        while not stop.is_set():
            try:
                await self.step()
            except (*REDIS_FAILURES, BackendUnavailable) as exc:
                log.warning("finalizer: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
        log.info("finalizer %s stopped (%d applied)", self.consumer, self.applied)


def _stream_entries(reply: Any) -> list[tuple[Any, list[Entry]]]:
    """XREADGROUP's answer as (stream, entries) pairs (a list; a map on some protocols)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(name, entries) for name, entries in reply]
