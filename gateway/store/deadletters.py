"""The finalizer's dead letters put back: each one onto its SKU bucket's order stream, oldest
first, atomically with leaving the dead-letter stream (`replay_dead.lua`), for a finalizer to
process again once the cause is repaired. Listing them is `figures.dead_letters`."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store import calls, keys
from gateway.store.buckets import Layouts
from gateway.store.outcomes import Replayed, ReplayReply
from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.streams import entries


async def replay_dead(
    redis: Client, scripts: ScriptRegistry, sku_ids: Sequence[str] | None = None
) -> list[tuple[str, str, str]]:
    """Put back every dead letter of `sku_ids` (every registered SKU by default). Returns
    (sku_id, dead letter id, its new order-stream entry id) for each one put back."""
    script = scripts["replay_dead"]
    done: list[tuple[str, str, str]] = []
    for sku_id, _, tag in await Layouts(redis).every_bucket(sku_ids):  # each has its own
        sk = keys.SkuKeys(tag)
        async for dead_id, _ in entries(redis, sk.dead):
            reply = ReplayReply.of(await script(redis, *calls.replay_dead(sk, dead_id=dead_id)))
            if reply.code is Replayed.REPLAYED:
                done.append((sku_id, text(dead_id), reply.entry_id))
    return done
