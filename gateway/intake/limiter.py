"""Token bucket for order creation, one budget per gateway instance.

`rate` tokens per second refill a bucket of `burst` tokens, which starts full; each order takes
one. `take()` answers 0.0 (allowed) or the seconds until a token will be there (for
`Retry-After`). Time comes from an injected monotonic clock in seconds.

The state is 16 bytes (tokens, last refill time: two float64). With `path=None` it lives in a
local buffer: one process. With `path` it lives in an `mmap` of that small file, and every
read-modify-write holds `flock(LOCK_EX)` on it, so the worker processes of one instance
(`uvicorn --workers N`) share one budget instead of each getting their own. `time.monotonic` is
CLOCK_MONOTONIC, which is system wide on Linux, so the processes' times compare.

Why not Redis: this was checked before any Redis work. The limiter exists to protect the one
Redis round trip each order costs; a Redis bucket would spend that round trip on every request,
refused ones included, and would fail with the backend it is meant to shield. An mmap and two
flock calls cost about 1.5 µs per take (uncontended) and need nothing outside the host.

Use: open the bucket in each process after it starts (the app lifespan), never before a fork:
a forked child shares the parent's open file and so its lock. Keep the file on tmpfs
(`/dev/shm`, `$XDG_RUNTIME_DIR`), one per instance. A bucket is not thread safe; use it from
one event loop.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from types import TracebackType

_STATE = struct.Struct("=dd")  # tokens, last refill time (clock seconds)
_SIZE = _STATE.size  # 16 bytes


class TokenBucket:
    """`rate` tokens per second into a bucket of `burst`; shared through `path` if given."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.configure(rate, burst)
        self._clock = clock
        self._fd = -1  # >= 0: the shared file, locked around every read-modify-write
        self._map: mmap.mmap | None = None
        self._buf: bytearray | mmap.mmap
        if path is None:
            self._buf = bytearray(_STATE.pack(self._cap, clock()))
        else:
            self._fd, self._map = self._open(path)
            self._buf = self._map

    def configure(self, rate: float, burst: int) -> None:
        """Take a new rate and capacity (a runtime rule) without losing the tokens there: a
        lower capacity caps them at the next take, a higher one fills with the refill."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of tokens per second, not {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1 token, not {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._cap = float(burst)

    def _open(self, path: str | os.PathLike[str]) -> tuple[int, mmap.mmap]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _SIZE:  # new or torn: nobody can be using it yet
                    os.ftruncate(fd, _SIZE)
                    buf = mmap.mmap(fd, _SIZE)
                    _STATE.pack_into(buf, 0, self._cap, self._clock())
                    return fd, buf
                buf = mmap.mmap(fd, _SIZE)
                tokens, last = _STATE.unpack_from(buf)
                now = self._clock()
                if not (math.isfinite(tokens) and math.isfinite(last)):
                    _STATE.pack_into(buf, 0, self._cap, now)
                elif last > now:
                    # written before a reboot reset the clock: keep the tokens, restart time
                    _STATE.pack_into(buf, 0, min(tokens, self._cap), now)
                return fd, buf
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise

    def take(self) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one will be there."""
        fd = self._fd
        buf = self._buf
        tokens: float
        last: float
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            tokens, last = _STATE.unpack_from(buf)
            now = self._clock()  # read under the lock: times written by others are earlier
            if now > last:  # a clock going backwards adds nothing and moves nothing
                tokens += (now - last) * self.rate
                if tokens > self._cap:
                    tokens = self._cap
                last = now
            if tokens >= 1.0:
                _STATE.pack_into(buf, 0, tokens - 1.0, last)
                return 0.0
            _STATE.pack_into(buf, 0, tokens, last)
            return (1.0 - tokens) / self.rate
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @property
    def tokens(self) -> float:
        """Tokens there now, after refill, without taking one (for headers and metrics)."""
        fd = self._fd
        tokens: float
        last: float
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            tokens, last = _STATE.unpack_from(self._buf)
            now = self._clock()
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)
        if now > last:
            tokens += (now - last) * self.rate
        return min(tokens, self._cap)

    def close(self) -> None:
        """Unmap and close the shared file (idempotent); a no-op for a local bucket."""
        if self._map is not None:
            fd, self._fd = self._fd, -1
            m, self._map = self._map, None
            try:
                m.close()  # still self._buf: a later take() raises ValueError
            finally:
                os.close(fd)

    def __enter__(self) -> TokenBucket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
