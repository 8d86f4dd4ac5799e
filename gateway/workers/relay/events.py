"""One outbound event as the relay delivers it: its id, its type and its JSON body.

An entry of a SKU bucket's events stream (`fg:{S}:events`, every value a string; see
`docs/api/events.md`) becomes the body the receiver gets: the same fields, `history` as an
array, numbers as numbers. Its id, `<sku_id>/<bucket>/<entry id>`, is unique across every SKU
and bucket and the same at every delivery, so a receiver deduplicates on it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

NUMBERS = frozenset({"quantity", "created_at", "at"})  # decimal strings on the stream
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Event:
    """One event, ready to send: `id` and `type` travel as headers, `body` as the payload."""

    id: str
    type: str
    body: bytes


def event_id(sku_id: str, bucket: int, entry_id: str) -> str:
    """The event's id: `<sku_id>/<bucket>/<entry id>` (bucket 0 for a SKU without buckets)."""
    return f"{sku_id}/{bucket}/{entry_id}"


def from_entry(sku_id: str, bucket: int, entry_id: bytes, fields: Mapping[bytes, bytes]) -> Event:
    """The event of one stream entry. Raises ValueError for an entry that is not an event
    (no `event` field, unreadable history or numbers): such an entry is dead-lettered."""
    body: dict[str, object] = {}
    for raw_key, raw_value in fields.items():
        key, value = raw_key.decode(), raw_value.decode()
        if key == "history":
            try:
                body[key] = msgspec.json.decode(value)
            except msgspec.DecodeError:
                raise ValueError("history is not JSON") from None
        elif key in NUMBERS:
            body[key] = int(value)
        else:
            body[key] = value
    kind = body.get("event")
    if not isinstance(kind, str) or not kind:
        raise ValueError("entry has no event field")
    return Event(event_id(sku_id, bucket, entry_id.decode()), kind, _encode(body))
