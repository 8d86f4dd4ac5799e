"""A queued order's place in its SKU bucket's queue, when it may expect a decision, and when
its shopper should ask again.

Every order a bucket's stream takes is numbered by create_order.lua (`queue_seq`, from the
bucket's `queue_in` counter); finalize.lua and dead_letter.lua count every order that leaves
(`queue_out`) and finalize.lua measures the drain rate. An order's position is the difference,
read with its record by read_order.lua: O(1) whatever the queue's length. `queue_out` only
grows, so one order's successive positions never increase.

An order pre-queued for a fair start counts in `queue_in` (it is ahead of every order that came
after the start) and leaves when the draw decides it (draw_decide.lua); until then it has no
place (position and ETA null) and its shopper is asked back at the sale's start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gateway.schemas import QueueView

POLL_MIN_S = 1
POLL_MAX_S = 30
POLL_SHARE = 4  # a shopper asks about four times over the ETA
PLACES_PER_POLL_S = 50  # rate unknown: one more second between polls per 50 places
STALE_MS = 30_000  # nothing drained for this long (and 5 drains' time): the ETA is unknown
STALE_DRAINS = 5


def eta_s(position: int, rate: float, drained_at_ms: int | None, now_ms: int) -> float | None:
    """Seconds until the order at `position` is decided at `rate` orders per second; None
    when the rate is unknown or the queue has not moved for a while (finalizers down)."""
    if rate <= 0:
        return None
    if drained_at_ms is not None and now_ms - drained_at_ms > max(
        STALE_MS, STALE_DRAINS * 1000 / rate
    ):
        return None
    return round(position / rate, 1)


def poll_after_s(position: int, eta: float | None) -> int:
    """Whole seconds before the shopper should ask again: a quarter of the ETA, or, while it is
    unknown, a second per 50 places; at least 1, at most 30."""
    wait = eta / POLL_SHARE if eta is not None else position / PLACES_PER_POLL_S
    return min(POLL_MAX_S, max(POLL_MIN_S, math.ceil(wait)))


def place(figures: Sequence[Any]) -> QueueView:
    """The QUEUED order's view from read_order.lua's queue figures: queue_seq, queue_out,
    drain_rate, drained_at, now_ms (a figure not known yet is empty), and for a pre-queued
    order waiting for its SKU's draw (queue_seq empty) the SKU's starts_at."""
    if not figures[0]:
        return waiting_for_draw(int(figures[5]), int(figures[4]))
    seq, out, rate, drained_at, now = figures
    position = max(1, int(seq) - int(out or 0))
    eta = eta_s(position, float(rate or 0), int(drained_at) if drained_at else None, int(now))
    return QueueView(position=position, eta_s=eta, poll_after_s=poll_after_s(position, eta))


def waiting_for_draw(starts_at_s: int, now_ms: int) -> QueueView:
    """A pre-queued order before its SKU's draw ranked it: no position nor ETA; ask again at
    the start (at least 1 s, at most 30 s away: the start may be moved earlier)."""
    wait = math.ceil((starts_at_s * 1000 - now_ms) / 1000)
    return QueueView(position=None, eta_s=None, poll_after_s=min(POLL_MAX_S, max(POLL_MIN_S, wait)))
