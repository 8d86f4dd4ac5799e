"""Slow-call circuit breaker with Sentinel's semantics (DegradeRule, grade SLOW_REQUEST_RATIO).

- A call is *slow* when its response time exceeds `rt_ms`; a failed or timed-out call counts
  as slow too.
- CLOSED: calls pass and are counted in fixed stat windows of `window_ms`. The breaker opens
  when, within one window, at least `min_calls` calls completed and the slow share exceeds
  `slow_ratio` (or every call was slow when `slow_ratio` is 1.0).
- OPEN: every call is refused (`503 busy`) until `open_s` has passed since it opened.
- HALF_OPEN: the first call after that is the one probe; the others are refused while it runs.
  A slow or failed probe opens the breaker again for `open_s`; a fast one closes it with a
  fresh window.

One breaker per worker process, like Sentinel's per-JVM rules. Time comes from an injected
monotonic clock in seconds.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        rt_ms: float = 800,
        slow_ratio: float = 0.5,
        min_calls: int = 5,
        window_ms: float = 1000,
        open_s: float = 10,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self.configure(
            rt_ms=rt_ms,
            slow_ratio=slow_ratio,
            min_calls=min_calls,
            window_ms=window_ms,
            open_s=open_s,
        )
        self.clock = clock
        self.on_transition = on_transition
        self.state = State.CLOSED
        self.opened_at = 0.0
        self._window_start = clock()
        self._calls = 0
        self._slow = 0

    def configure(
        self, *, rt_ms: float, slow_ratio: float, min_calls: int, window_ms: float, open_s: float
    ) -> None:
        """Take new thresholds (a runtime rule) and keep the state: an open breaker stays open
        until `open_s` (the new one) has passed since it opened; the current window keeps its
        counts and ends at its start plus the new `window_ms`."""
        self.rt_s = rt_ms / 1000
        self.slow_ratio = slow_ratio
        self.min_calls = min_calls
        self.window_s = window_ms / 1000
        self.open_s = open_s

    def allow(self) -> bool:
        """May a call start now? In HALF_OPEN only the single probe is let through."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.open_s:
            self._move(State.HALF_OPEN)
            return True  # this caller is the probe
        return False

    def retry_after_s(self) -> int:
        """Whole seconds until the breaker lets a probe through (at least 1)."""
        left = self.open_s - (self.clock() - self.opened_at)
        return max(1, math.ceil(left))

    def record(self, elapsed_s: float, *, failed: bool = False) -> None:
        """Report a call that `allow()` let through, once, whatever its outcome."""
        slow = failed or elapsed_s > self.rt_s
        if self.state is State.HALF_OPEN:
            if slow:
                self._open()
            else:
                self._reset_window(self.clock())
                self._move(State.CLOSED)
            return
        if self.state is State.OPEN:
            return  # a call that started before the breaker opened
        now = self.clock()
        if now - self._window_start >= self.window_s:
            # fixed windows aligned to the first, as Sentinel's LeapArray with one bucket
            self._reset_window(now - (now - self._window_start) % self.window_s)
        self._calls += 1
        self._slow += slow
        if self._calls >= self.min_calls and self._tripped():
            self._open()

    def _tripped(self) -> bool:
        share = self._slow / self._calls
        return share > self.slow_ratio or (self.slow_ratio >= 1.0 and share == 1.0)

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._move(State.OPEN)

    def _reset_window(self, start: float) -> None:
        self._window_start = start
        self._calls = 0
        self._slow = 0

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        if self.on_transition is not None and old is not new:
            self.on_transition(old, new)
