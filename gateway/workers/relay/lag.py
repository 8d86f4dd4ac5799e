"""Measuring the relay's lag over its stream index: events its group has not confirmed yet, and
the time of the oldest one (an entry id is its commit time in ms).

One pipeline over every stream: XINFO GROUPS (the group's `pending` and `lag`, entries not yet
handed out) and XPENDING's summary (its oldest pending id). Only a stream with nothing pending
but entries not yet handed out is read once more, in a second pipeline (its first entry after
the group's last-delivered id). XINFO's `lag` is nil when Redis cannot tell it (an entry
deleted after the group's position): such a stream's entries after that position are counted
with XRANGE, up to `COUNT_CAP`, beyond which its length stands in (an upper bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.streams import id_order

COUNT_CAP = 1000


@dataclass(frozen=True, slots=True)
class Lag:
    events: int  # not yet confirmed by the group: pending, plus not yet handed out
    oldest_ms: int  # commit time (epoch ms) of the oldest of them; 0: none


@dataclass(slots=True)
class _Open:
    """One stream's figures from the first pass."""

    stream: str
    pending: int
    lag: int | None  # None: Redis could not tell
    last: str  # the group's last-delivered id
    oldest: str | None  # the oldest pending id


async def measure(redis: Client, streams: Sequence[str], group: str) -> Lag:
    """The lag of `group` summed over `streams` (a stream or group missing counts 0)."""
    if not streams:
        return Lag(0, 0)
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    opened = [
        found
        for i, stream in enumerate(streams)
        if (found := _first_pass(stream, group, replies[2 * i], replies[2 * i + 1])) is not None
    ]
    events = sum(o.pending + (o.lag or 0) for o in opened)
    oldest = [o.oldest for o in opened if o.oldest]
    unread = [o for o in opened if o.lag is None or (o.pending == 0 and o.lag > 0)]
    if unread:
        async with redis.pipeline(transaction=False) as pipe:
            for o in unread:
                pipe.xrange(o.stream, min="(" + o.last, count=1 if o.lag else COUNT_CAP)
                pipe.xlen(o.stream)
            more = await pipe.execute(raise_on_error=False)
        for i, o in enumerate(unread):
            after, length = more[2 * i], more[2 * i + 1]
            if isinstance(after, Exception) or not after:
                continue
            if o.pending == 0:
                oldest.append(text(after[0][0]))
            if o.lag is None:
                events += len(after) if len(after) < COUNT_CAP else int(length)
    first = min(oldest, key=id_order) if oldest else None
    return Lag(events, id_order(first)[0] if first else 0)


def _first_pass(stream: str, group: str, groups: Any, pending: Any) -> _Open | None:
    if isinstance(groups, Exception) or isinstance(pending, Exception):
        return None  # no such stream or group (yet): nothing unconfirmed
    mine = next((g for g in groups if text(g["name"]) == group), None)
    if mine is None:
        return None
    count = int(pending["pending"])
    lag = mine.get("lag")
    return _Open(
        stream=stream,
        pending=count,
        lag=None if lag is None else int(lag),
        last=text(mine["last-delivered-id"]),
        oldest=text(pending["min"]) if count else None,
    )
