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

from gateway.settings import Settings
from gateway.store import draws
from gateway.store.draws import Draws
from gateway.store.outcomes import DrawDecided, DrawState

log = logging.getLogger("flashgate")


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
            outcome, after = await self.store.decide(
                sku_id, cursor, batch, hold_ttl_ms=self.hold_ttl_ms, now_ms=now_ms
            )
            sent += 1
            if outcome is DrawDecided.NOT_DRAWING:
                break  # another drawer finished it
            if outcome is DrawDecided.DECIDED:
                self.decided += after - cursor
            cursor = after  # STALE: the stored cursor, where another drawer got to
        log.info("draw of SKU %s done", sku_id)
        return DrawState.DONE
