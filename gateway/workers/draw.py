"""Drawer: runs a SKU's fair-start draw at its start (every finalizer has one).

The draw opens once the sale started (`draw_open.lua`: the pre-queue closes, its size is
fixed), the pre-queued orders are ranked by HMAC-SHA256(seed, order id) in Python (Lua has no
HMAC), and decided in rank order, a batch per `draw_decide.lua` call, which moves the draw's
cursor in the same atomic step as the batch's decisions. So any number of drawers may run the
same draw at once: each batch is applied once (a drawer whose cursor is stale learns the
stored one and goes on from there), and a drawer that dies mid-draw is resumed from the cursor
by the next one, which ranks the same frozen pre-queue the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.errors import BackendUnavailable
from gateway.settings import Settings
from gateway.store import draws, keys
from gateway.store.draws import Draws
from gateway.store.outcomes import DrawDecided, DrawState
from gateway.telemetry.drawing import DRAW_DURATION, DRAW_ORDERS
from gateway.transport.connect import Client
from gateway.transport.replies import text

log = logging.getLogger("flashgate")

NOT_DUE_RETRY_S = 0.05  # a draw the server found not due yet is tried again this much later


class DrawBroken(RuntimeError):
    """The closed pre-queue does not hold the number of orders the draw opened with."""


class Drawer:
    def __init__(self, store: Draws, settings: Settings) -> None:
        self.store = store
        self.batch = settings.draw_batch
        self.hold_ttl_ms = settings.hold_ttl_s * 1000
        self.decided = 0  # orders this drawer decided

    async def draw(
        self, sku_id: str, *, now_ms: int | None = None, max_batches: int | None = None
    ) -> DrawState:
        """Run (or resume) the SKU's draw to its end. Returns where it stands: DONE, or
        NO_DRAW / NOT_DUE (nothing done), or DRAWING when `max_batches` batches (the staged
        crash of the tests) stopped this drawer first."""
        opened = await self.store.open(sku_id, now_ms=now_ms)
        if opened.code is not DrawState.DRAWING:
            return opened.code
        prequeued = await self.store.prequeued(sku_id)
        if len(prequeued) != opened.total:
            raise DrawBroken(
                f"SKU {sku_id}: the draw opened with {opened.total} orders, "
                f"the pre-queue holds {len(prequeued)}"
            )
        ranked = draws.ranked(opened.seed, prequeued)
        cursor, sent = opened.cursor, 0
        if cursor == 0:
            log.info("draw of SKU %s: %d pre-queued orders", sku_id, opened.total)
        else:
            log.warning("draw of SKU %s resumed at %d of %d", sku_id, cursor, opened.total)
        while cursor < opened.total:
            if max_batches is not None and sent >= max_batches:
                return DrawState.DRAWING
            batch = ranked[cursor : cursor + self.batch]
            done = await self.store.decide(
                sku_id, cursor, batch, hold_ttl_ms=self.hold_ttl_ms, now_ms=now_ms
            )
            sent += 1
            if done.code is DrawDecided.NOT_DRAWING:
                break  # another drawer finished it
            if done.code is DrawDecided.DECIDED:
                self.decided += done.cursor - cursor
                _count(done.held, done.rejected)
                if done.cursor == opened.total:  # this drawer's batch ended the draw
                    await self._timed(sku_id)
            cursor = done.cursor  # STALE: the stored cursor, where another drawer got to
        log.info("draw of SKU %s done", sku_id)
        return DrawState.DONE

    async def _timed(self, sku_id: str) -> None:
        """Observe the draw's length, opening to last batch (a failed read skips it: the
        draw is done whatever the metric says)."""
        try:
            seconds = await self.store.duration_s(sku_id)
        except BackendUnavailable:
            log.warning("draw of SKU %s done; its length not read", sku_id)
            return
        if seconds is not None:
            DRAW_DURATION.observe(seconds)
            log.info("draw of SKU %s took %.3f s", sku_id, seconds)


def _count(held: int, rejected: int) -> None:
    if held:
        DRAW_ORDERS.labels("HELD").inc(held)
    if rejected:
        DRAW_ORDERS.labels("REJECTED").inc(rejected)


class DrawWatch:
    """A finalizer's view of the draws: which of its streams wait for their SKU's draw (not
    read meanwhile) and when each sale starts; runs the draws that are due."""

    def __init__(self, drawer: Drawer, clock: Callable[[], float] = time.time) -> None:
        self.drawer = drawer
        self.clock = clock  # wall clock, epoch s
        self.held: dict[str, float] = {}  # stream -> its SKU's start, epoch s
        self.released: set[str] = set()  # held streams whose draw is done

    async def read(self, redis: Client, streams: dict[str, str]) -> None:
        """Read the draw state of the SKUs in the draw registry and of the streams held
        (`streams`: stream -> its bucket's tag); a SKU whose draw is done leaves the
        registry."""
        registered = {text(m) for m in await redis.smembers(keys.DRAW_REGISTRY)}
        names = [s for s, tag in streams.items() if tag in registered or s in self.held]
        async with redis.pipeline(transaction=False) as pipe:
            for stream in names:
                pipe.hmget(keys.SkuKeys(streams[stream]).sku, "draw", "starts_at")
            states = await pipe.execute()
        held = {
            stream: float(starts_at or 0)
            for stream, (draw, starts_at) in zip(names, states, strict=True)
            if draw in (b"pending", b"drawing")
        }
        done = [streams[s] for s, (draw, _) in zip(names, states, strict=True) if draw == b"done"]
        if done:
            await redis.srem(keys.DRAW_REGISTRY, *done)
        self.released.update(s for s in self.held if s not in held)  # drawn by another
        self.held = held

    def wait(self, stream: str) -> None:
        """An entry of `stream` waits for its SKU's draw (its state not read yet)."""
        self.held.setdefault(stream, 0.0)

    async def run_due(self, streams: dict[str, str]) -> list[str]:
        """Run the draw of every held stream whose sale started. Returns the streams whose
        draw is done since the last call (to read their pending entries again)."""
        now = self.clock()
        for stream, starts_at in list(self.held.items()):
            if starts_at > now:
                continue
            try:
                state = await self.drawer.draw(streams[stream])
            except DrawBroken as exc:
                log.error("%s", exc)
                continue
            if state is DrawState.NOT_DUE:  # this clock is ahead of the server's
                self.held[stream] = now + NOT_DUE_RETRY_S
                continue
            del self.held[stream]
            self.released.add(stream)
        released, self.released = list(self.released), set()
        return released

    def block_ms(self, block_ms: int) -> int:
        """A read's BLOCK: no longer than until the next held SKU's start."""
        if not self.held:
            return block_ms
        wait_ms = (min(self.held.values()) - self.clock()) * 1000
        return max(1, min(block_ms, int(wait_ms)))
