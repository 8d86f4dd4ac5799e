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
from gateway.store.buckets import Layouts
from gateway.transport.connect import Client
from gateway.transport.streams import entries
from gateway.workers.relay.events import Event, from_entry
from gateway.workers.relay.target import Refused, Target, Unreachable

META = (b"entry_id", b"event_id", b"group", b"reason")  # what relay_dead.lua adds


@dataclass(slots=True)
class Replay:
    sent: list[str]  # the event ids delivered again
    stopped: str | None = None  # why the replay stopped early (None: every one was sent)


async def replay_dead(
    redis: Client, target: Target, group: str, sku_ids: Sequence[str] | None = None
) -> Replay:
    """Send the dead letters of `group` again through `target` (started by the caller)."""
    out = Replay(sent=[])
    for sku_id, bucket, tag in await Layouts(redis).every_bucket(sku_ids):
        dead_stream = keys.SkuKeys(tag).relay_dead
        async for dead_id, fields in entries(redis, dead_stream):
            if fields.get(b"group", b"").decode() != group:
                continue  # another target's
            event = _event(sku_id, bucket, fields)
            if event is None:
                continue  # not an event: it stays dead, for people to look at
            try:
                await target.deliver(event)
            except (Refused, Unreachable) as exc:
                out.stopped = f"{event.id}: {exc}"
                return out
            await redis.xdel(dead_stream, dead_id)
            out.sent.append(event.id)
    return out


def _event(sku_id: str, bucket: int, fields: dict[bytes, bytes]) -> Event | None:
    own = {k: v for k, v in fields.items() if k not in META}
    try:
        event = from_entry(sku_id, bucket, fields.get(b"entry_id", b""), own)
    except ValueError:
        return None
    stored = fields.get(b"event_id", b"").decode()
    return Event(stored or event.id, event.type, event.body)
