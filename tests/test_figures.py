"""What Redis holds, read for the people on call (gateway/store/figures.py), at 10,000 SKUs on
a real Valkey: a pass is two round trips (writes counted on the ops reader's own connection),
`/metrics` and the console share one pass within its age, and the order path's connection
carries none of it. Counts, not timings: the time a pass takes is in docs/testing/benchmarks.md.

These tests build their own app on `redis_url` rather than use the `redis` fixture: its
teardown audits every SKU, and 10,000 of them are the audit's own benchmark, not this test's."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.crc import key_slot

from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.figures import PER_CALL, Sampler, collector_paused, paused
from gateway.transport.cluster import ClusterMux
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed
from gateway.web.app import create_app
from tests.support.api import ADMIN, ADMIN_TOKEN, create, put_sku

SKUS = 10_000


def stock_of(i: int) -> int:
    return 1000 + i  # a different stock per SKU: every figure read is the SKU's own


@pytest.fixture
async def many_skus(redis_url: str) -> AsyncIterator[str]:
    """SKUS configured SKUs (configure_sku.lua, the registry), flushed again afterwards."""
    client = create_client(Settings(redis_url=redis_url, redis_timeout_ms=30_000))
    mux = Multiplexed(redis_url, timeout_s=30.0)
    try:
        await client.flushall()
        scripts = ScriptRegistry()
        await scripts.load_all(client)
        sha = scripts["configure_sku"].sha
        commands: list[tuple[object, ...]] = [
            ("SADD", keys.SKU_REGISTRY, *(f"s{i}" for i in range(SKUS)))
        ]
        for i in range(SKUS):
            ks, args = calls.configure_sku(
                keys.SkuKeys(f"s{i}"), promotion_id="p", stock=stock_of(i), per_user_limit=5,
                starts_at=None, ends_at=None, by="test", client="", changes_kept=10,
                stock_mode="set", buckets=1, total_stock=None, log_change=False,
                prequeue_s=0, draw_seed="", draw_commitment="",
            )  # fmt: skip
            commands.append(("EVALSHA", sha, len(ks), *ks, *args))
        replies = await mux.execute_many(commands)
        assert not [r for r in replies if isinstance(r, Exception)]
        yield redis_url
    finally:
        await client.flushall()
        await mux.aclose()
        await client.aclose()


@pytest.mark.parametrize("per_call", [1, PER_CALL])
async def test_a_pass_over_10000_skus_is_two_round_trips(many_skus: str, per_call: int) -> None:
    """One SKU a call (a cluster's way) or PER_CALL a call (one server's); SKUs registered
    but not configured, amid the others, are left out and move nothing."""
    reader = Multiplexed(many_skus, timeout_s=30.0)
    try:
        await reader.execute_command("SADD", keys.SKU_REGISTRY, "s1x", "s4321x", "zz")
        sampler = Sampler(reader, ScriptRegistry(), max_age_s=0, per_call=per_call)
        before = reader.writes
        sample = await sampler.sample()
        first = reader.writes - before
        assert first <= 3  # the connection's handshake (SELECT) may be one of them
        assert len(sample.skus) == SKUS
        assert [s.sku_id for s in sample.skus] == sorted(f"s{i}" for i in range(SKUS))
        by_id = {s.sku_id: s for s in sample.skus}
        for i in (0, 1, 4321, SKUS - 1):
            s = by_id[f"s{i}"]
            assert (s.stock, s.available, s.held, s.sold, s.holds) == (
                stock_of(i),
                stock_of(i),
                0,
                0,
                0,
            )
        before = reader.writes
        await sampler.sample()
        assert reader.writes - before == 2  # connected: exactly two
    finally:
        await reader.aclose()


async def test_metrics_and_console_share_one_pass_off_the_order_path(many_skus: str) -> None:
    settings = Settings(redis_url=many_skus, admin_token=ADMIN_TOKEN, redis_timeout_ms=30_000)
    app = create_app(settings.replace(figures_max_age_ms=60_000))
    async with app.router.lifespan_context(app):
        services = app.state.services
        reader, order_path = services.figures.reader, services.inventory.fast
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            # one order on the order path's connection
            assert (await create(c, sku_id="s7", promotion_id="p")).status_code == 202
            reads, orders = reader.writes, order_path.writes
            view = (await c.get("/api/v1/admin/console", headers=ADMIN)).json()
            assert reader.writes - reads <= 3  # two, and the connection's first
            assert len(view["skus"]) == SKUS and view["entries_in"] == 1
            reads = reader.writes
            text = (await c.get("/metrics")).text
            await c.get("/api/v1/admin/console", headers=ADMIN)
            assert reader.writes == reads  # within the age: the same pass, no round trip
            lines = [ln for ln in text.splitlines() if ln.startswith("flashgate_sku_stock{")]
            assert len(lines) == SKUS
            assert 'flashgate_sku_held{sku="s7"} 1.0' in text
            assert 'flashgate_sku_holds{sku="s7"} 1.0' in text
            assert 'flashgate_sku_available{sku="s9999"} 10999.0' in text
            assert order_path.writes == orders  # none of it on the order path's connection


async def test_a_bucketed_sku_is_summed_and_its_layout_read_once(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, admin_token=ADMIN_TOKEN, redis_timeout_ms=30_000)
    app = create_app(settings.replace(figures_max_age_ms=0))
    async with app.router.lifespan_context(app):
        await app.state.services.redis.flushall()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            assert (await put_sku(c, "hot", stock=30, buckets=3)).status_code == 201
            assert (await put_sku(c, "plain", stock=7)).status_code == 201
            for user in ("a", "b", "c", "d"):
                assert (await create(c, sku_id="hot", user_id=user)).status_code == 202
            sampler = Sampler(app.state.services.figures.reader, ScriptRegistry(), max_age_s=0)
            reader = sampler.reader
            await sampler.sample()  # connected
            fresh = Sampler(reader, ScriptRegistry(), max_age_s=0, per_call=PER_CALL)
            before = reader.writes
            hot, plain = (await fresh.sample()).skus
            assert reader.writes - before == 3  # its other buckets, once
            assert (hot.stock, hot.held, hot.available, hot.holds) == (30, 4, 26, 4)
            assert (plain.sku_id, plain.stock, plain.held) == ("plain", 7, 0)
            before = reader.writes
            await fresh.sample()
            assert reader.writes - before == 2
        await app.state.services.redis.flushall()


async def test_a_pass_on_a_cluster_reads_every_node(cluster_url: str) -> None:
    """`ClusterMux.execute_many`: the calls grouped by the node of their slot, one write per
    node; every SKU's figures come back, each its own."""
    client = create_client(Settings(redis_url=cluster_url, redis_cluster=True))
    mux = ClusterMux(cluster_url, timeout_s=30.0)
    try:
        await client.flushall()
        scripts = ScriptRegistry()
        await scripts.load_all(client)
        ids = [f"c{i}" for i in range(200)]
        commands: list[tuple[object, ...]] = [("SADD", keys.SKU_REGISTRY, *ids)]
        for i, sku_id in enumerate(ids):
            ks, args = calls.configure_sku(
                keys.SkuKeys(sku_id), promotion_id="p", stock=stock_of(i), per_user_limit=5,
                starts_at=None, ends_at=None, by="test", client="", changes_kept=10,
                stock_mode="set", buckets=1, total_stock=None, log_change=False,
                prequeue_s=0, draw_seed="", draw_commitment="",
            )  # fmt: skip
            commands.append(("EVAL", scripts["configure_sku"].source, len(ks), *ks, *args))
        assert not [r for r in await mux.execute_many(commands) if isinstance(r, Exception)]
        nodes = {mux._owner[key_slot(keys.SkuKeys(s).sku.encode())] for s in ids}
        assert len(nodes) > 1  # the pass spans several nodes
        before = mux.writes
        sample = await Sampler(mux, scripts, max_age_s=0).sample(streams=2)
        assert [(s.sku_id, s.stock) for s in sample.skus] == sorted(
            (sku_id, stock_of(i)) for i, sku_id in enumerate(ids)
        )
        # the mode's and the registry's nodes (in parallel), then one write per node: two
        # round trips, each one write per node it needs
        assert mux.writes - before <= 2 + len(nodes)
    finally:
        await client.flushall()
        await mux.aclose()
        await client.aclose()


def test_the_collector_is_paused_for_a_pass_and_back_after_the_last() -> None:
    """Passes (and their threads) overlap: the collector comes back on with the last one to
    end, and stays off if it was off before the first."""
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pass is still under way
    assert gc.isenabled()
    assert paused(lambda a, b: (gc.isenabled(), a + b), 2, 3) == (False, 5)
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()
