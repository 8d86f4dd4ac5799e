"""configure_sku.lua and audit_sku.lua called directly against the real server."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import ConfigureResult, CreateResult
from gateway.transport.scripts import ScriptRegistry

pytestmark = pytest.mark.lua


@pytest.fixture
def inv(redis: Redis, settings: Settings) -> Inventory:
    return Inventory(redis, ScriptRegistry(), settings)


def cfg(stock: int, limit: int = 5, **kw: int) -> SkuConfig:
    return SkuConfig(promotion_id="p", stock=stock, per_user_limit=limit, **kw)


async def hold(inv: Inventory, n: int, user: str = "u") -> None:
    for i in range(n):
        r = OrderRequest(user_id=f"{user}{i}", sku_id="s", quantity=1, promotion_id="p")
        assert (await inv.create_order(r, f"key-{user}{i}"))[0] is CreateResult.CREATED


async def test_create_then_update_keeps_the_identity(inv: Inventory) -> None:
    assert await inv.configure_sku("s", cfg(10)) == (ConfigureResult.CREATED, 0)
    await hold(inv, 3)
    assert await inv.configure_sku("s", cfg(20)) == (ConfigureResult.UPDATED, 0)
    view = await inv.get_sku("s")
    assert view is not None
    assert (view.stock, view.available, view.held, view.sold) == (20, 17, 3, 0)
    assert await inv.configure_sku("s", cfg(3)) == (ConfigureResult.UPDATED, 0)
    view = await inv.get_sku("s")
    assert view is not None and (view.available, view.held) == (0, 3)


async def test_stock_below_held_is_refused_and_changes_nothing(
    inv: Inventory, redis: Redis
) -> None:
    await inv.configure_sku("s", cfg(10))
    await hold(inv, 4)
    before = await redis.hgetall(keys.SkuKeys("s").sku)
    assert await inv.configure_sku("s", cfg(3)) == (ConfigureResult.STOCK_BELOW_COMMITTED, 4)
    assert await redis.hgetall(keys.SkuKeys("s").sku) == before


async def test_window_can_be_set_and_cleared(inv: Inventory) -> None:
    await inv.configure_sku("s", cfg(1, starts_at=100, ends_at=200))
    view = await inv.get_sku("s")
    assert view is not None and (view.starts_at, view.ends_at) == (100, 200)
    await inv.configure_sku("s", cfg(1))
    view = await inv.get_sku("s")
    assert view is not None and (view.starts_at, view.ends_at) == (None, None)


@pytest.mark.corrupts
async def test_audit_sees_the_holds_behind_the_counters(inv: Inventory, redis: Redis) -> None:
    await inv.configure_sku("s", cfg(10))
    await hold(inv, 3)
    row = await inv.audit_sku("s")
    assert row is not None
    assert (row.held, row.holds_count, row.holds_units, row.users_total) == (3, 3, 3, 3)
    assert row.breaches() == []
    await redis.hincrby(keys.SkuKeys("s").sku, "held", 1)  # a corrupted counter
    row = await inv.audit_sku("s")
    assert row is not None
    assert "stock != available + held + sold" in row.breaches()
    assert any("active holds" in b for b in row.breaches())


async def test_audit_after_script_flush(inv: Inventory, redis: Redis) -> None:
    await inv.configure_sku("s", cfg(2))
    await redis.script_flush()
    row = await inv.audit_sku("s")
    assert row is not None and row.breaches() == []
    assert await inv.audit_sku("missing") is None


async def test_each_change_is_logged_in_the_same_step(inv: Inventory, redis: Redis) -> None:
    changes = keys.SkuKeys("s").changes
    await inv.configure_sku("s", cfg(10, starts_at=100), by="alice", client="10.0.0.1")
    await inv.configure_sku("s", cfg(4, limit=2), by="bob")
    entries: Any = await redis.xrevrange(changes)
    (_, updated), (_, created) = entries
    assert created.pop(b"at").isdigit() and updated.pop(b"at").isdigit()
    assert created == {
        b"by": b"alice",
        b"client": b"10.0.0.1",
        b"action": b"created",
        b"after:promotion_id": b"p",
        b"after:stock": b"10",
        b"after:per_user_limit": b"5",
        b"after:starts_at": b"100",
        b"after:ends_at": b"",
        b"after:prequeue_s": b"0",
    }
    assert updated == {
        b"by": b"bob",
        b"client": b"",
        b"action": b"updated",
        b"before:promotion_id": b"p",
        b"before:stock": b"10",
        b"before:per_user_limit": b"5",
        b"before:starts_at": b"100",
        b"before:ends_at": b"",
        b"before:prequeue_s": b"0",
        b"after:promotion_id": b"p",
        b"after:stock": b"4",
        b"after:per_user_limit": b"2",
        b"after:starts_at": b"",
        b"after:ends_at": b"",
        b"after:prequeue_s": b"0",
    }
    await hold(inv, 3)
    refused = await inv.configure_sku("s", cfg(2), by="eve")
    assert refused == (ConfigureResult.STOCK_BELOW_COMMITTED, 3)
    assert await redis.xlen(changes) == 2  # refused: nothing recorded


async def test_the_change_log_is_trimmed(inv: Inventory, redis: Redis) -> None:
    script = inv.scripts["configure_sku"]
    sk = keys.SkuKeys("s")
    await redis.sadd(keys.SKU_REGISTRY, "s")
    for stock in range(300):
        call = calls.configure_sku(
            sk,
            promotion_id="p",
            stock=stock,
            per_user_limit=1,
            starts_at=None,
            ends_at=None,
            by="ops",
            client="",
            changes_kept=10,
            stock_mode="set",
            buckets=None,
            total_stock=None,
            log_change=True,
            prequeue_s=0,
            draw_seed="",
            draw_commitment="",
        )
        assert (await script(redis, *call))[0] > 0
    # MAXLEN ~: whole stream nodes (100 entries by default) are dropped, never the newest 10.
    assert 10 <= await redis.xlen(sk.changes) < 300
    changes = await inv.sku_changes("s", 1)
    assert changes is not None and [c.after.stock for c in changes] == [299]
