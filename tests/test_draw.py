"""A fair start's draw, exactly once: a drawer that dies mid-draw resumed by another, drawers
and finalizers at once, finalizers that read the orders before the draw."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from gateway.settings import Settings
from gateway.store import draws, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import DrawState
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer
from gateway.workers.finalizer import Finalizer
from tests.support.fairstart import FairStart
from tests.support.state import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


async def _decided_once(fs: FairStart, ids: list[str], stock: int) -> None:
    """Every pre-queued order decided exactly once, in rank order, and stock exact."""
    view = await fs.inv.draws.view("s")
    assert view is not None
    assert view.orders == draws.ranked(await fs.seed(), ids)
    assert draws.problems(view, prequeued=set(ids)) == []
    held = 0
    for order_id in view.orders:
        history = json.loads((await fs.record(order_id))["history"])
        assert len(history) == 2, history
        held += history[1]["to"] == "HELD"
    assert held == min(stock, len(ids))
    sku = await fs.inv.get_sku("s")
    assert sku is not None and (sku.held, sku.available) == (held, stock - held)


async def test_a_drawer_that_dies_mid_draw_is_resumed_exactly_once(
    fs: FairStart, settings: Settings
) -> None:
    await fs.sku(stock=30)
    ids = await fs.prequeue(100)
    await fs.start()
    first = Drawer(fs.inv.draws, settings.replace(draw_batch=7))
    assert await first.draw("s", max_batches=3) is DrawState.DRAWING  # then it "dies"
    sku = await fs.inv.get_sku("s")
    assert sku is not None and sku.draw == "drawing"
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "draw_cursor") or 0) == 21
    assert await fs.inv.draws.view("s") is None
    # an order now is not pre-queued (the pre-queue is closed) and takes no stock
    result, body = await fs.order("late")
    assert json.loads(body)["status"] == "QUEUED"
    assert await fs.redis.scard(keys.SkuKeys("s").prequeue) == 100
    second = Drawer(fs.inv.draws, settings.replace(draw_batch=11))
    assert await second.draw("s") is DrawState.DONE
    assert (first.decided, second.decided) == (21, 79)
    assert await second.draw("s") is DrawState.DONE  # done stays done, nothing decided again
    assert second.decided == 79
    await _decided_once(fs, ids, 30)
    await fs.drain()


async def test_two_drawers_at_once_draw_once(fs: FairStart, settings: Settings) -> None:
    await fs.sku(stock=100)
    ids = await fs.prequeue(250)
    await fs.start()
    clients = [create_client(settings) for _ in range(2)]
    try:
        drawers = []
        for client in clients:
            scripts = ScriptRegistry()
            await scripts.load_all(client)
            inv = Inventory(client, scripts, settings)
            drawers.append(Drawer(inv.draws, settings.replace(draw_batch=5)))
        states = await asyncio.gather(*(d.draw("s") for d in drawers))
    finally:
        for client in clients:
            await client.aclose()
    assert states == [DrawState.DONE, DrawState.DONE]
    assert sum(d.decided for d in drawers) == 250
    await _decided_once(fs, ids, 100)
    await fs.drain()


async def test_finalizers_hold_the_stream_until_the_draw(fs: FairStart) -> None:
    """Two finalizers: whichever reads the entries before the draw leaves them pending; after
    the draw each decides what it holds, once."""
    await fs.sku(stock=3)
    early = await fs.prequeue(6)
    other = Finalizer(fs.redis, fs.inv.scripts, fs.settings, name="f2")
    other.claim_every_s = 0.0
    assert await other.step(block=False) == 0
    assert await fs.drain() == 0
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(2)]
    other._streams_read_at = fs.fin._streams_read_at = -1e9  # both see the start now
    handled = await asyncio.gather(other.step(block=False), fs.fin.step(block=False))
    handled_more = await fs.drain() + await other.step(block=False)
    assert sum(handled) + handled_more == 8
    statuses = [(await fs.record(oid))["status"] for oid in early + late]
    assert statuses.count("HELD") == 3 and statuses[6:] == ["REJECTED", "REJECTED"]
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "backlog") or 0) == 0


async def test_a_finalizer_whose_entries_waited_reads_them_once_another_drew(
    fs: FairStart,
) -> None:
    """f2 read the entries before it knew of the draw (left pending) and still takes the start
    to be an hour away (the start was moved earlier); f1 draws; f2 learns the draw is done at
    its next look and decides what it holds at once, not after the claim timeout (30 s)."""
    await fs.sku(stock=4)
    early = await fs.prequeue(3)
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(2)]
    other = Finalizer(fs.redis, fs.inv.scripts, fs.settings, name="f2")
    await other.refresh_streams()
    stream = keys.SkuKeys("s").stream
    other.draws.held.clear()  # it has not seen the draw's state yet
    assert await other.step(block=False) == 0  # read, every entry WAITING, left pending
    pending: Any = await fs.redis.xpending(stream, keys.FINALIZER_GROUP)
    assert pending["pending"] == 5
    other.draws.held[stream] = time.time() + 3600
    assert await other.step(block=False) == 0  # not due in its view: nothing read
    assert await fs.fin.drawer.draw("s") is DrawState.DONE  # f1 draws
    other._streams_read_at = -1e9  # its next look at the SKUs
    assert await other.step(block=False) == 5
    statuses = [(await fs.record(oid))["status"] for oid in early + late]
    assert statuses[:3] == ["HELD"] * 3 and sorted(statuses[3:]) == ["HELD", "REJECTED"]
    assert int(await fs.redis.hget(keys.SkuKeys("s").sku, "backlog") or 0) == 0
