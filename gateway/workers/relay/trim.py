"""Trimming an events stream below what every consumer group has confirmed.

A group's floor is its oldest pending entry, or, with nothing pending, the id right after the
last entry it was handed. The stream keeps everything from the lowest floor over all its groups
(`XTRIM MINID`), so no group ever loses an entry it has not confirmed; while a group has been
handed nothing yet, nothing is trimmed.

Per group, XINFO GROUPS is read before XPENDING: an entry handed out between the two is above
the last-delivered id read first, so it stays; one still pending at the second read is its floor.
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
    floors = []
    for group in groups:
        last = text(group["last-delivered-id"])
        if last == "0-0":
            return None
        pending = await redis.xpending(stream, text(group["name"]))
        floors.append(text(pending["min"]) if int(pending["pending"]) else next_id(last))
    return min(floors, key=id_order) if floors else None


async def trim_stream(redis: Client, stream: str) -> int:
    """Drop the entries every group has confirmed; returns how many went."""
    floor = await trim_floor(redis, stream)
    if floor is None:
        return 0
    dropped: int = await redis.xtrim(stream, minid=floor, approximate=False)
    return dropped
