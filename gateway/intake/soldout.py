"""SoldOutMemo: each gateway process remembers which SKUs are sold out and refuses them from
memory, so the flood that arrives after a sell-out costs no Redis round trip.

A SKU enters the memo when the order script answers sold out with nothing left available. The
memo then refuses that SKU for `recheck_s`; after that exactly one request goes to Redis again
(the others keep being refused from memory) and either renews the memo or, if stock came back
(an expired hold, more stock configured), clears it. A published `stock:<sku_id>` notice clears
it at once.

Shoppers whose order for the SKU was accepted must still get their first answer replayed
byte for byte, so the memo also keeps the SKU's accepted `<key>:<user>` pairs (read from
Redis when the SKU enters the memo and, newer ones only, at each re-check); their requests go
to Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    recheck_at: float
    promotion_id: str
    accepted_until_ms: float = 0.0  # latest replay deadline read: re-reads start here
    accepted: set[str] = field(default_factory=set)


class SoldOutMemo:
    def __init__(self, recheck_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic):
        self.recheck_s = recheck_s
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def refuses(self, sku_id: str, promotion_id: str, member: str) -> bool:
        """True: answer `sold_out` from memory. False: ask Redis (not known sold out, another
        promotion, which the script answers `unknown_sku`, an accepted shopper's replay, or
        this request is the SKU's re-check)."""
        entry = self._entries.get(sku_id)
        if entry is None or entry.promotion_id != promotion_id or member in entry.accepted:
            return False
        now = self.clock()
        if now >= entry.recheck_at:
            entry.recheck_at = now + self.recheck_s  # this request re-checks; the rest wait
            return False
        return True

    def accepted_since(self, sku_id: str) -> float:
        """Replay deadline (epoch ms) from which to read the SKU's accepted pairs."""
        entry = self._entries.get(sku_id)
        return entry.accepted_until_ms if entry is not None else 0.0

    def sold_out(
        self, sku_id: str, promotion_id: str, accepted: Iterable[str], accepted_until_ms: float
    ) -> None:
        """Redis said the SKU, in this promotion, has nothing available: refuse it for
        `recheck_s`."""
        entry = self._entries.get(sku_id)
        if entry is None or entry.promotion_id != promotion_id:
            entry = self._entries[sku_id] = _Entry(recheck_at=0.0, promotion_id=promotion_id)
        entry.recheck_at = self.clock() + self.recheck_s
        entry.accepted.update(accepted)
        entry.accepted_until_ms = max(entry.accepted_until_ms, accepted_until_ms)

    def forget(self, sku_id: str) -> None:
        """Stock may be back: stop refusing the SKU."""
        self._entries.pop(sku_id, None)

    def clear(self) -> None:
        self._entries.clear()
