"""The finalizer's dead letters put back: each one onto its SKU bucket's order stream, oldest
first, atomically with leaving the dead-letter stream (`replay_dead.lua`), for a finalizer to
process again once the cause is repaired. Listing them is `figures.dead_letters`."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store import calls, keys
from gateway.store.outcomes import Replayed, ReplayReply
from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.scripts import ScriptRegistry

BATCH = 100  # dead letters read per XRANGE


async def replay_dead(
    redis: Client, scripts: ScriptRegistry, sku_ids: Sequence[str] | None = None
) -> list[tuple[str, str, str]]:
    """Put back every dead letter of `sku_ids` (every registered SKU by default). Returns
    (sku_id, dead letter id, its new order-stream entry id) for each one put back."""
    if sku_ids is None:
        members: set[bytes] = await redis.smembers(keys.SKU_REGISTRY)  # type: ignore[assignment]
        sku_ids = sorted(m.decode() for m in members)
    script = scripts["replay_dead"]
    done: list[tuple[str, str, str]] = []
    for sku_id in sku_ids:
        buckets = int(await redis.hget(keys.SkuKeys(sku_id).sku, "buckets") or 1)
        for tag in keys.bucket_tags(sku_id, buckets):  # each stock bucket has its own
            sk = keys.SkuKeys(tag)
            start = "-"
            while True:
                entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(
                    sk.dead, min=start, count=BATCH
                )  # type: ignore[assignment]
                if not entries:
                    break
                for dead_id, _ in entries:
                    reply = ReplayReply.of(
                        await script(redis, *calls.replay_dead(sk, dead_id=dead_id))
                    )
                    if reply.code is Replayed.REPLAYED:
                        done.append((sku_id, text(dead_id), reply.entry_id))
                start = "(" + text(entries[-1][0])
    return done
