"""Test state helpers: an injected clock, a whole-keyspace snapshot, the after-test audit,
and the marker of tests that run on one server and on a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.settings import Settings
from gateway.store.inventory import Inventory
from gateway.transport.scripts import ScriptRegistry


class Clock:
    """An injected monotonic clock (seconds) that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every key with its type and value: to prove a refused request changed nothing."""
    out: dict[bytes, Any] = {}
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out[key] = await redis.get(key)
        elif kind == "hash":
            out[key] = await redis.hgetall(key)
        elif kind == "zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = await redis.smembers(key)
        elif kind == "stream":
            out[key] = await redis.xrange(key)
        else:
            out[key] = kind
    return out


async def audit_breaches(client: Redis, settings: Settings) -> dict[str, list[str]]:
    scripts = ScriptRegistry()
    await scripts.load_all(client)
    inventory = Inventory(client, scripts, settings)
    found: dict[str, list[str]] = {}
    for sku_id in await inventory.sku_ids():
        row = await inventory.audit_sku(sku_id)
        problems = ["registered, no config"] if row is None else row.breaches()
        if problems:
            found[sku_id] = problems
    return found


# Tests that take `settings` run on one server; those of a module (or a test) marked
# `BOTH_BACKENDS` run on one server and on the 3-primary cluster.
# FLASHGATE_TEST_BACKEND=cluster runs everything on the cluster.
BOTH_BACKENDS = pytest.mark.both_backends
