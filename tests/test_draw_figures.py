"""A fair start's draw as the people on call see it: `sku_figures.lua`'s draw fields through
the `Sampler` (pending with its open pre-queue, drawing with its cursor, done), the lines of
`flashgate status` and `GET /metrics`, and the drawers' counters and duration; on one server
and on a cluster."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.ops import status
from gateway.schemas import SkuConfig
from gateway.settings import Settings
from gateway.store.figures import Sampler, SkuSample
from gateway.store.outcomes import DrawState
from gateway.telemetry import metrics
from gateway.transport.connect import create_reader
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer
from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.fairstart import FairStart
from tests.support.state import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


def _counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _sku(sampler: Sampler, sku_id: str) -> SkuSample:
    sample = await sampler.sample(streams=2)
    return next(s for s in sample.skus if s.sku_id == sku_id)


async def test_the_draw_in_the_figures_status_and_metrics(
    fs: FairStart, settings: Settings, redis: Redis
) -> None:
    reader = create_reader(settings, fs.inv.redis)
    sampler = Sampler(reader, ScriptRegistry(), max_age_s=0)
    try:
        await fs.inv.configure_sku("plain", SkuConfig(promotion_id="p", stock=5, per_user_limit=1))
        await fs.sku(stock=10)
        assert (await _sku(sampler, "s")).draw == "pending"
        await fs.prequeue(25)
        s = await _sku(sampler, "s")
        assert (s.draw, s.prequeued, s.drawn) == ("pending", 25, 0)
        plain = await _sku(sampler, "plain")
        assert (plain.draw, plain.prequeued, plain.drawn) == ("none", 0, 0)

        await fs.start()
        held_before = _counted("flashgate_draw_orders_total", outcome="HELD")
        rejected_before = _counted("flashgate_draw_orders_total", outcome="REJECTED")
        timed_before = _counted("flashgate_draw_duration_seconds_count")
        first = Drawer(fs.inv.draws, settings.replace(draw_batch=4))
        assert await first.draw("s", max_batches=2) is DrawState.DRAWING  # then it "dies"
        s = await _sku(sampler, "s")
        assert (s.draw, s.prequeued, s.drawn) == ("drawing", 25, 8)
        assert _counted("flashgate_draw_orders_total", outcome="HELD") == held_before + 8
        assert _counted("flashgate_draw_duration_seconds_count") == timed_before

        before = await sampler.sample(streams=2)
        lines = status.render(before, before)
        assert "draw s: drawing, 25 pre-queued, 8 decided" in lines
        assert not any(line.startswith("draw plain") for line in lines)
        text = metrics.figures_text(before).decode()
        assert 'flashgate_sku_draw_state{sku="s",state="drawing"} 1.0' in text
        assert 'flashgate_sku_draw_state{sku="s",state="pending"} 0.0' in text
        assert 'flashgate_sku_draw_prequeued{sku="s"} 25.0' in text
        assert 'flashgate_sku_draw_drawn{sku="s"} 8.0' in text
        assert 'sku="plain",state=' not in text and 'draw_drawn{sku="plain"}' not in text

        second = Drawer(fs.inv.draws, settings.replace(draw_batch=5))
        assert await second.draw("s") is DrawState.DONE
        s = await _sku(sampler, "s")
        assert (s.draw, s.prequeued, s.drawn) == ("done", 25, 25)
        # 10 units: the first 10 of the ranking held, the other 15 rejected, each counted once
        assert _counted("flashgate_draw_orders_total", outcome="HELD") == held_before + 10
        assert _counted("flashgate_draw_orders_total", outcome="REJECTED") == rejected_before + 15
        assert _counted("flashgate_draw_duration_seconds_count") == timed_before + 1
        assert await second.draw("s") is DrawState.DONE  # done: nothing counted again
        assert _counted("flashgate_draw_duration_seconds_count") == timed_before + 1
        opened, drawn = await redis.hmget("fg:{s}:sku", "draw_opened_at", "drawn_at")
        assert opened is not None and drawn is not None and int(drawn) >= int(opened)
    finally:
        await reader.aclose()


async def test_the_console_view_carries_the_draw_of_a_fair_start_only(client: Client) -> None:
    """The view's SKU rows: a fair start's SKU has its draw, pre-queued and decided counts
    (the page shows any such field as a column), a SKU without one has none of them."""
    r = await put_sku(client, starts_at=int(time.time()) + 1800, prequeue_s=3600)
    assert r.status_code == 201, r.text
    assert (await put_sku(client, "plain")).status_code == 201
    for user in ("u1", "u2"):
        assert (await create(client, user_id=user)).status_code == 202
    view = (await client.get("/api/v1/admin/console", headers=ADMIN)).json()
    rows = {s["sku_id"]: s for s in view["skus"]}
    fair, plain = rows["sku-42"], rows["plain"]
    assert (fair["draw"], fair["prequeued"], fair["drawn"]) == ("pending", 2, 0)
    assert not {"draw", "prequeued", "drawn"} & set(plain)
