"""Trimming a stream below what every consumer group of it has confirmed: the finalizers'
order streams and the relays' events streams alike.

A group's floor is its oldest pending entry, or, with nothing pending, the id right after the
last entry it was handed. The stream keeps everything from the lowest floor over all its groups
(`XTRIM MINID`), so no group ever loses an entry it has not confirmed (another target's relay,
an operator's own consumer group); while a group has been handed nothing yet, nothing is
trimmed.

XINFO GROUPS is read before the groups' XPENDING summaries: an entry handed out between the two
is above the last-delivered id read first, so it stays; one still pending at the second read is
its group's floor. A floor read before an XTRIM only lags behind the groups, never ahead.
"""

from __future__ import annotations

from redis.exceptions import ResponseError

from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.streams import id_order


def next_id(entry_id: str) -> str:
    """The smallest stream id above `entry_id`."""
    ms, seq = id_order(entry_id)
    return f"{ms}-{seq + 1}"


async def trim_floor(redis: Client, stream: str) -> str | None:
    """The lowest first-unconfirmed id over every group of `stream`; None: trim nothing (no
    group, or a group handed nothing yet)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream (yet)
        return None
    if not groups or any(text(g["last-delivered-id"]) == "0-0" for g in groups):
        return None
    async with redis.pipeline(transaction=False) as pipe:
        for group in groups:
            pipe.xpending(stream, text(group["name"]))
        summaries = await pipe.execute(raise_on_error=False)
    floors = []
    for group, pending in zip(groups, summaries, strict=True):
        if isinstance(pending, Exception):  # the group went between the two reads
            return None
        last = text(group["last-delivered-id"])
        floors.append(text(pending["min"]) if int(pending["pending"]) else next_id(last))
    return min(floors, key=id_order)


async def trim_stream(redis: Client, stream: str) -> int:
    """Drop the entries every group has confirmed; returns how many went."""
    floor = await trim_floor(redis, stream)
    if floor is None:
        return 0
    dropped: int = await redis.xtrim(stream, minid=floor, approximate=False)
    return dropped
