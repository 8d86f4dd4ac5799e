"""Reading a whole stream a page at a time, oldest first."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.transport.connect import Client
from gateway.transport.replies import text

Entry = tuple[bytes, dict[bytes, bytes]]


def id_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a sort key: (milliseconds, sequence)."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


async def entries(redis: Client, stream: str, *, page: int = 100) -> AsyncIterator[Entry]:
    """Every entry of `stream`, oldest first, `page` per XRANGE. Entries deleted or added
    behind the one just given do not disturb the walk (each page starts after the last id)."""
    start = "-"
    while True:
        got: list[Entry] = await redis.xrange(stream, min=start, count=page)  # type: ignore[assignment]
        for entry in got:
            yield entry
        if len(got) < page:
            return
        start = "(" + text(got[-1][0])
