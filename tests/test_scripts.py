"""LuaScript's NOSCRIPT path against the real server."""

from __future__ import annotations

import uuid
from typing import Any

from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.scripts import ScriptRegistry


class FlushingClient:
    """Runs each command on the real server, then flushes its script cache: every reload a
    caller makes is gone again before its next command (the race of a flush under load)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        try:
            return await self.redis.execute_command(*args, **options)
        finally:
            await self.redis.script_flush()


async def test_a_flush_right_after_noscript_does_not_fail_the_call(
    redis: Redis, settings: Settings
) -> None:
    """NOSCRIPT is answered with EVAL of the source: nothing can flush the script between a
    reload and the call, and the order is applied once."""
    scripts = ScriptRegistry()
    await Inventory(redis, scripts, settings).configure_sku(
        "s", SkuConfig(promotion_id="p", stock=5, per_user_limit=5)
    )
    await redis.script_flush()  # whatever earlier tests loaded
    flushing = FlushingClient(redis)
    inv = Inventory(redis, scripts, settings, fast=flushing)
    req = OrderRequest(user_id="u", sku_id="s", quantity=1, promotion_id="p")
    key = str(uuid.uuid4())
    assert (await inv.create_order(req, key))[0] is CreateResult.CREATED
    assert (await inv.create_order(req, key))[0] is CreateResult.REPLAYED
    assert flushing.commands == ["EVALSHA", "EVAL"] * 2
    sku = await redis.hgetall(keys.SkuKeys("s").sku)
    assert (sku[b"available"], sku[b"held"]) == (b"4", b"1")
    assert await redis.xlen(keys.SkuKeys("s").stream) == 1
