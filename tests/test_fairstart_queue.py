"""Shoppers in line with a fair start, on the real server: a pre-queued order has no place
before the draw (position and ETA null, asked back at the start); the draw's decisions leave
the line, so the orders that came after the start move up batch by batch, then as the
finalizer drains them, and the queue's counters stay the backlog throughout."""

from __future__ import annotations

import json
import time

import pytest

from gateway.schemas import QueueView
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.outcomes import CreateResult, DrawState
from gateway.workers.draw import Drawer
from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.fairstart import FairStart
from tests.support.state import BOTH_BACKENDS

PREQUEUED = 6
LATE = 5


async def test_a_prequeued_order_has_no_place_until_the_draw(client: Client) -> None:
    starts_at = int(time.time()) + 1800
    r = await put_sku(client, starts_at=starts_at, prequeue_s=3600)
    assert r.status_code == 201, r.text
    body = (await create(client)).json()
    assert (body["status"], body["position"], body["opens_at"]) == ("QUEUED", None, starts_at)
    r = await client.get(f"/api/v1/order/{body['order_id']}")
    assert r.status_code == 200
    order = r.json()
    assert (order["status"], order["opens_at"]) == ("QUEUED", starts_at)
    # half an hour to the start: asked back no later than 30 s (the start may move earlier)
    assert order["queue"] == {"position": None, "eta_s": None, "poll_after_s": 30}
    assert r.headers["Retry-After"] == "30"
    # the start moved to 4 s from now: asked back at the start, not later
    r = await put_sku(client, starts_at=int(time.time()) + 4, prequeue_s=3600)
    assert r.status_code == 200 and r.json()["draw"] == "pending"
    r = await client.get(f"/api/v1/order/{body['order_id']}")
    wait = r.json()["queue"]["poll_after_s"]
    assert 1 <= wait <= 4 and r.headers["Retry-After"] == str(wait)
    sku = (await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert sku["draw"] == "pending"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(finalizer_batch=2)  # the draw and the finalizer in steps of 2


async def counters(fs: FairStart) -> tuple[int, int, int]:
    raw = await fs.redis.hmget(keys.SkuKeys("s").sku, "queue_in", "queue_out", "backlog")
    queue_in, queue_out, backlog = (int(v or 0) for v in raw)
    assert queue_in - queue_out == backlog  # the line is the backlog
    return queue_in, queue_out, backlog


async def places(fs: FairStart, order_ids: list[str]) -> list[QueueView | None]:
    views = [await fs.inv.get_order(oid) for oid in order_ids]
    assert all(v is not None and (v.queue is not None) == (v.status == "QUEUED") for v in views)
    return [v.queue for v in views if v is not None]


@BOTH_BACKENDS
async def test_orders_after_the_start_move_up_as_the_draw_decides(fs: FairStart) -> None:
    await fs.sku(stock=PREQUEUED + LATE, limit=1)
    early = await fs.prequeue(PREQUEUED)
    await fs.start()
    late: list[str] = []
    for i in range(LATE):  # NORMAL mode: queued behind the pre-queue while the draw is due
        result, body = await fs.order(f"late{i}")
        assert result is CreateResult.CREATED
        answer = json.loads(body)
        assert (answer["status"], answer["position"]) == ("QUEUED", PREQUEUED + 1 + i)
        late.append(answer["order_id"])
    assert await counters(fs) == (PREQUEUED + LATE, 0, PREQUEUED + LATE)
    for view in await places(fs, early):  # still waiting for the draw: no place
        assert view is not None and (view.position, view.eta_s) == (None, None)
        assert view.poll_after_s == 1  # the start has passed

    # The draw, two orders a batch: each batch's orders leave the line at once.
    drawer = Drawer(fs.inv.draws, fs.settings.replace(draw_batch=2))
    seen: dict[str, list[int]] = {oid: [] for oid in late}
    decided = 0
    while await drawer.draw("s", max_batches=1) is DrawState.DRAWING:
        decided = min(decided + 2, PREQUEUED)
        assert (await counters(fs))[1] == decided
        for oid, view in zip(late, await places(fs, late), strict=True):
            assert view is not None and view.position is not None
            seen[oid].append(view.position)
        assert [seen[oid][-1] for oid in late] == [PREQUEUED + 1 + i - decided for i in range(LATE)]
    assert await counters(fs) == (PREQUEUED + LATE, PREQUEUED, LATE)
    after_draw = await places(fs, late)
    assert [v.position if v else None for v in after_draw] == [1 + i for i in range(LATE)]
    for oid, view in zip(late, after_draw, strict=True):
        assert view is not None and view.position is not None
        seen[oid].append(view.position)
    assert [(await fs.record(oid))["status"] for oid in early] == ["HELD"] * PREQUEUED
    assert await places(fs, early) == [None] * PREQUEUED

    # The finalizer acknowledges the drawn orders' entries (already out of the line) and
    # decides the late ones in arrival order: positions only fall, to 1 for the next.
    while await fs.fin.step(block=False):
        await counters(fs)
        for oid, view in zip(late, await places(fs, late), strict=True):
            if view is not None:
                assert view.position is not None
                seen[oid].append(view.position)
    for oid in late:
        positions = seen[oid]
        assert all(a >= b for a, b in zip(positions, positions[1:], strict=False)), positions
    assert await counters(fs) == (PREQUEUED + LATE, PREQUEUED + LATE, 0)
    assert [(await fs.record(oid))["status"] for oid in late] == ["HELD"] * LATE
