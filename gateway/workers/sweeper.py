"""Sweeper: releases holds past their deadline, in batches, one atomic `sweep.lua` call per
batch of a SKU. Each order is re-checked inside the script, so several sweepers can run side by
side and a hold is never released twice; a hold paid in time is never selected. Keyspace
notifications are not used: they are fire-and-forget, the holds index is not."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import ResponseError

from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.buckets import Layouts, Mover
from gateway.store.outcomes import Swept
from gateway.transport.connect import Client, create_script_client
from gateway.transport.durable import acked
from gateway.transport.replies import REDIS_FAILURES, text
from gateway.transport.scripts import ScriptRegistry

log = logging.getLogger("flashgate")


class Sweeper:
    def __init__(self, redis: Client, scripts: ScriptRegistry, settings: Settings) -> None:
        self.redis = redis
        self.interval_s = settings.sweep_interval_ms / 1000
        self.batch = settings.sweep_batch
        self._sweep = scripts["sweep"]
        self.layouts = Layouts(redis)
        # Stock moved between buckets is as durable as an order (WAITAOF when asked): on the
        # order path's kind of client, so the wait reaches the node that ran the write.
        self._fast = create_script_client(settings) if acked(settings, redis) is not redis else None
        self.mover = Mover(acked(settings, self._fast or redis), scripts)
        self.stale_ms = settings.claim_stale_ms
        self.transfers_completed = 0
        self.released = 0

    async def sweep_sku(self, sku_id: str, *, now_ms: int | None = None) -> int:
        """Release every due hold of one SKU (in each of its stock buckets, where it also
        completes stock transfers left halfway); returns how many orders expired."""
        total = total_moved = 0
        tags = await self.layouts.all_tags(sku_id)
        for tag in tags:
            sk = keys.SkuKeys(tag)
            kept = 0  # due holds left in the index (a record missing): skipped next call
            while True:
                call = calls.sweep(
                    sk, now_ms=now_ms, batch=self.batch, orders_prefix=sk.orders_prefix, skip=kept
                )
                swept = Swept.of(await self._sweep(self.redis, *call))
                total += swept.released
                kept += swept.selected - swept.removed
                if swept.selected < self.batch:
                    break
            if len(tags) > 1:
                completed = await self.mover.complete_stale(self.redis, tag, self.stale_ms)
                self.transfers_completed += completed
                total_moved += completed
        if total or total_moved:
            # Stock came back: gateways that remember the SKU as sold out forget it.
            await self.redis.publish(keys.NOTICES, keys.stock_notice(sku_id))
        return total

    async def sweep_once(self, *, now_ms: int | None = None) -> int:
        total = 0
        for raw in await self.redis.smembers(keys.SKU_REGISTRY):
            try:
                total += await self.sweep_sku(text(raw), now_ms=now_ms)
            except ResponseError as exc:  # one SKU's problem must not stop the others
                log.error("sweeper: SKU %s: %s", text(raw), exc)
        self.released += total
        return total

    async def aclose(self) -> None:
        """Close the client of durable stock moves, if one was made."""
        if self._fast is not None:
            await self._fast.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `interval_s` until `stop` is set; Redis outages are waited out."""
        log.info("sweeper started (every %.1f s)", self.interval_s)
        while not stop.is_set():
            try:
                released = await self.sweep_once()
                if released:
                    log.info("sweeper released %d expired hold(s)", released)
            except REDIS_FAILURES as exc:
                log.warning("sweeper: Redis unavailable (%s); retrying", exc)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        log.info("sweeper stopped (%d released)", self.released)
