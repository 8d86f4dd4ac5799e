"""`flashgate relay --replay-dead`: the relay's dead letters of one target sent again.

Each dead letter of the target's consumer group (`fg:{S}:relay-dead`, every SKU bucket) is
delivered again, oldest first, with its event id unchanged, so the receiver still deduplicates
it; once the target confirmed it, it leaves the dead-letter stream. The first refusal stops the
replay (the rest stay dead, the reason is told): the target is still refusing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.store import keys
from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.workers.relay.events import Event, from_entry
from gateway.workers.relay.target import Refused, Target, Unreachable

BATCH = 100  # dead letters read per XRANGE
META = (b"entry_id", b"event_id", b"group", b"reason")  # what relay_dead.lua adds


@dataclass(slots=True)
class Replay:
    sent: list[str]  # the event ids delivered again
    stopped: str | None = None  # why the replay stopped early (None: every one was sent)


async def replay_dead(
    redis: Client, target: Target, group: str, sku_ids: Sequence[str] | None = None
) -> Replay:
    """Send the dead letters of `group` again through `target` (started by the caller)."""
    if sku_ids is None:
        members: set[bytes] = await redis.smembers(keys.SKU_REGISTRY)  # type: ignore[assignment]
        sku_ids = sorted(m.decode() for m in members)
    out = Replay(sent=[])
    for sku_id in sku_ids:
        buckets = int(await redis.hget(keys.SkuKeys(sku_id).sku, "buckets") or 1)
        for bucket, tag in enumerate(keys.bucket_tags(sku_id, buckets)):
            out.stopped = await _replay_bucket(redis, target, group, sku_id, bucket, tag, out)
            if out.stopped:
                return out
    return out


async def _replay_bucket(
    redis: Client, target: Target, group: str, sku_id: str, bucket: int, tag: str, out: Replay
) -> str | None:
    dead_stream = keys.SkuKeys(tag).relay_dead
    start = "-"
    while True:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(
            dead_stream, min=start, count=BATCH
        )  # type: ignore[assignment]
        if not entries:
            return None
        for dead_id, fields in entries:
            if fields.get(b"group", b"").decode() != group:
                continue  # another target's
            event = _event(sku_id, bucket, fields)
            if event is None:
                continue  # not an event: it stays dead, for people to look at
            try:
                await target.deliver(event)
            except (Refused, Unreachable) as exc:
                return f"{event.id}: {exc}"
            await redis.xdel(dead_stream, dead_id)
            out.sent.append(event.id)
        start = "(" + text(entries[-1][0])


def _event(sku_id: str, bucket: int, fields: dict[bytes, bytes]) -> Event | None:
    own = {k: v for k, v in fields.items() if k not in META}
    try:
        event = from_entry(sku_id, bucket, fields.get(b"entry_id", b""), own)
    except ValueError:
        return None
    stored = fields.get(b"event_id", b"").decode()
    return Event(stored or event.id, event.type, event.body)
