"""`flashgate relay --forget`: a relay target retired for good.

A target's consumer group sits on every SKU bucket's events stream, and the trim keeps every
entry a group has not confirmed (`gateway/workers/trim.py`), so a group no relay reads any more
holds the events streams back forever. Forgetting destroys the group on every events stream
(the SKU registry and each SKU's buckets, as the relay walks them; a stream without the group is
skipped), drops the entries it still held pending with it, and removes its figures from
`fg:{mode}:relay-lag`. Its relay dead letters (`fg:{S}:relay-dead`) stay: they are counted, for
people to send again or delete.

Only a relay group (`relay:<kind>:<hash>`) is forgotten: the finalizers' group lives on the order
streams and is never touched, nor is any other group. A group whose relays reported within
`relaylag.STALE_S` is alive and refused unless forced: a live relay would join the streams again
from their first entry and deliver them all again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.setting import BROKER_SCHEMES
from gateway.settings import ConfigError, Settings
from gateway.store import keys, relaylag
from gateway.store.buckets import Layouts
from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.streams import entries
from gateway.workers.relay.loop import group_for

PREFIX = "relay:"


class Alive(Exception):
    """One of the group's relays reported within `relaylag.STALE_S`: stop it first."""

    def __init__(self, figures: relaylag.RelayLag, age_s: float) -> None:
        super().__init__(f"a relay of {figures.group} reported {age_s:.0f} s ago")
        self.figures = figures
        self.age_s = age_s


@dataclass(slots=True)
class Forgotten:
    group: str
    streams: list[tuple[str, int]] = field(default_factory=list)  # (events stream, pending dropped)
    figures: bool = False  # whether its lag figures were removed
    dead: list[tuple[str, str, int]] = field(default_factory=list)  # (sku_id, stream, kept)

    @property
    def pending(self) -> int:
        return sum(n for _, n in self.streams)

    @property
    def found(self) -> bool:
        """Whether there was anything of the group to forget."""
        return bool(self.streams or self.figures)


def target_group(settings: Settings) -> str:
    """The consumer group of FLASHGATE_RELAY_URL's target, as its relays name it."""
    url = settings.relay_url
    if not url:
        raise ConfigError("FLASHGATE_RELAY_URL is not set: name the group with --group")
    kind = "rabbitmq" if urlsplit(url).scheme in BROKER_SCHEMES else "webhook"
    return group_for(kind, url)


async def forget_group(redis: Client, group: str, *, now_ms: int, force: bool = False) -> Forgotten:
    """Destroy `group` on every events stream and drop its lag figures; raises Alive while one
    of its relays reported within `relaylag.STALE_S` (unless `force`), ValueError for a group
    that is not a relay's. Its dead letters are counted, not touched."""
    if not group.startswith(PREFIX):
        raise ValueError(f"{group!r} is not a relay group (relay:<kind>:<hash>)")
    figures = await relaylag.read(redis, group)
    if figures is not None and not force:
        age_s = (now_ms - figures.at_ms) / 1000
        if age_s <= relaylag.STALE_S:
            raise Alive(figures, max(age_s, 0.0))
    buckets = await Layouts(redis).every_bucket()
    out = Forgotten(group)
    out.streams = await _destroy(redis, [keys.SkuKeys(tag).events for _, _, tag in buckets], group)
    out.figures = await relaylag.remove(redis, group)
    for sku_id, _, tag in buckets:
        stream = keys.SkuKeys(tag).relay_dead
        if kept := await _dead_letters(redis, stream, group):
            out.dead.append((sku_id, stream, kept))
    return out


async def _destroy(redis: Client, streams: list[str], group: str) -> list[tuple[str, int]]:
    """XGROUP DESTROY on each stream that has the group; (stream, its pending entries) of each
    stream it was destroyed on."""
    if not streams:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
    held = {}
    for stream, groups in zip(streams, replies, strict=True):
        if isinstance(groups, Exception):  # no such stream: nothing to destroy
            continue
        for g in groups:
            if text(g["name"]) == group:
                held[stream] = int(g["pending"])
    if not held:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for stream in held:
            pipe.xgroup_destroy(stream, group)
        done = await pipe.execute(raise_on_error=False)
    return [(s, n) for (s, n), d in zip(held.items(), done, strict=True) if d == 1]


async def _dead_letters(redis: Client, stream: str, group: str) -> int:
    """How many dead letters of `group` a relay dead-letter stream holds."""
    mine = group.encode()
    return sum([1 async for _, fields in entries(redis, stream) if fields.get(b"group") == mine])
