"""Token buckets per user and per client address, in a fixed table: bounded memory whatever
the number of users and addresses that come.

Each of the two tables (users, clients) is `sets` x `WAYS` entries of 24 bytes: a 64-bit
fingerprint of the key (a keyed BLAKE2b, so nobody can aim two keys at one entry), the tokens
and the time of the last refill. A key lives in one set of `WAYS` entries, chosen by its
fingerprint. A new key takes an empty entry of its set, else the fullest one after refill: a
full bucket is worth nothing (a key without an entry starts full), so a flood of fresh keys
evicts fresh keys and never the drained bucket of a greedy client. With the default 16384
sets, each table holds 65536 keys in 1.5 MiB: 3 MiB for both, per instance.

As `limiter.TokenBucket`: with `path=None` the tables live in this process (anonymous
memory); with `path`, in an `mmap` of that file (sparse: memory is taken page by page as
entries are written), every check under `flock(LOCK_EX)`, so the workers of one instance
share them (one lock for both tables). The fingerprint key is drawn by the first process
that creates the file and kept in its header. Time: an injected monotonic clock in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable

WAYS = 4
SETS = 16_384  # per table: 65536 keys, 1.5 MiB
_MAGIC = b"fgkeyed1"
_HEAD = struct.Struct("=8s16sId")  # magic, fingerprint key, sets, made at (clock s)
_HEAD_SIZE = 48
_ENTRY = struct.Struct("=Qdd")  # fingerprint (0: empty), tokens, last refill (clock s)
_STATE = struct.Struct("=dd")  # an entry's tokens and last refill
_SET = struct.Struct("=" + "Qdd" * WAYS)
USER, CLIENT = "user", "client"  # the limit that refused, as the answer names it


def subscriber(address: str) -> str:
    """An IPv6 address's /64 (`2001:db8:1:2::/64`); any other text as it is."""
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except (OSError, ValueError):
        return address
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def capacity(qps: float, burst: int) -> float:
    """A bucket's capacity: `burst`, or one second of `qps` (at least 1) when it is 0."""
    return float(burst) if burst > 0 else float(max(1, math.ceil(qps)))


class KeyedBuckets:
    """The per-user and per-client buckets of one instance: `take(user, client)`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        path: str | os.PathLike[str] | None = None,
        sets: int = SETS,
    ) -> None:
        self._clock = clock
        self._sets = sets
        self._table = sets * _SET.size
        size = _HEAD_SIZE + 2 * self._table
        self.user_rate = self.client_rate = 0.0
        self.user_cap = self.client_cap = 0.0
        self.on = False  # either limit on
        self._fd = -1
        if path is None:  # anonymous: pages cost memory only once an entry is written
            self._buf = mmap.mmap(-1, size)
            _HEAD.pack_into(self._buf, 0, _MAGIC, secrets.token_bytes(16), sets, clock())
        else:
            self._fd, self._buf = self._open(path, size)
        _, key, _, _ = _HEAD.unpack_from(self._buf)
        self._hasher = hashlib.blake2b(digest_size=8, key=key)

    def _open(self, path: str | os.PathLike[str], size: int) -> tuple[int, mmap.mmap]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                head = os.pread(fd, _HEAD.size, 0)
                now = self._clock()
                usable = os.fstat(fd).st_size == size and len(head) == _HEAD.size
                if usable:
                    magic, _, sets, made = _HEAD.unpack(head)
                    # made after now: written before a reboot reset the clock, times void
                    usable = magic == _MAGIC and sets == self._sets and made <= now
                if not usable:  # new, torn, of another size or another boot: start again
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)  # zeros, sparse: a page costs once written
                    os.pwrite(fd, _HEAD.pack(_MAGIC, secrets.token_bytes(16), self._sets, now), 0)
                return fd, mmap.mmap(fd, size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise

    def configure(
        self, user_qps: float, user_burst: int, client_qps: float, client_burst: int
    ) -> None:
        """Take new rates and capacities (runtime rules); 0 qps turns that limit off. The
        tokens there are kept (capped by a lower capacity at the next take)."""
        self.user_rate, self.client_rate = float(user_qps), float(client_qps)
        self.user_cap = capacity(user_qps, user_burst) if user_qps > 0 else 0.0
        self.client_cap = capacity(client_qps, client_burst) if client_qps > 0 else 0.0
        self.on = user_qps > 0 or client_qps > 0

    def take(self, user: str, client: str) -> tuple[str, float]:
        """One order's token from the user's bucket and the client's (each only while its
        limit is on; "" client: unknown, not limited; an IPv6 client counts by its /64, what
        one subscriber gets). ("", 0.0) when allowed; else the limit that refused and the
        seconds until it has a token, and nothing is taken."""
        user_on = self.user_rate > 0
        client_on = self.client_rate > 0 and client != ""
        if not (user_on or client_on):
            return "", 0.0
        if client_on and ":" in client:
            client = subscriber(client)
        fd = self._fd
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = self._clock()
            if not client_on:
                at, tokens = self._find(0, user, now, self.user_rate, self.user_cap)
                return self._settle(USER, at, tokens, now, self.user_rate)
            c_at, c_tokens = self._find(self._table, client, now, self.client_rate, self.client_cap)
            if not user_on:
                return self._settle(CLIENT, c_at, c_tokens, now, self.client_rate)
            u_at, u_tokens = self._find(0, user, now, self.user_rate, self.user_cap)
            if u_tokens < 1.0 or c_tokens < 1.0:  # refused: neither is taken
                self._put(u_at, u_tokens, now)
                self._put(c_at, c_tokens, now)
                if u_tokens < 1.0:
                    return USER, (1.0 - u_tokens) / self.user_rate
                return CLIENT, (1.0 - c_tokens) / self.client_rate
            self._put(u_at, u_tokens - 1.0, now)
            self._put(c_at, c_tokens - 1.0, now)
            return "", 0.0
        finally:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _settle(
        self, limit: str, at: int, tokens: float, now: float, rate: float
    ) -> tuple[str, float]:
        if tokens < 1.0:
            self._put(at, tokens, now)
            return limit, (1.0 - tokens) / rate
        self._put(at, tokens - 1.0, now)
        return "", 0.0

    def _put(self, at: int, tokens: float, now: float) -> None:
        _STATE.pack_into(self._buf, at + 8, tokens, now)

    def _find(self, table: int, key: str, now: float, rate: float, cap: float) -> tuple[int, float]:
        """The offset of `key`'s entry (made if new, in place of its set's fullest) and its
        tokens after refill."""
        hasher = self._hasher.copy()
        hasher.update(key.encode("utf-8", "surrogateescape"))
        fp = int.from_bytes(hasher.digest(), "little") | 1  # never 0 (empty)
        base = _HEAD_SIZE + table + (fp >> 32) % self._sets * _SET.size
        entries = _SET.unpack_from(self._buf, base)
        for way in range(0, 3 * WAYS, 3):
            if entries[way] == fp:
                tokens, last = entries[way + 1], entries[way + 2]
                if now > last:  # a clock going backwards adds nothing
                    tokens += (now - last) * rate
                return base + way * 8, tokens if tokens < cap else cap
        victim, fullest = base, -1.0
        for way in range(0, 3 * WAYS, 3):
            if entries[way] == 0:  # an empty entry is taken first
                victim = base + way * 8
                break
            tokens, last = entries[way + 1], entries[way + 2]
            if now > last:
                tokens += (now - last) * rate
            if tokens > fullest:
                victim, fullest = base + way * 8, tokens
        _ENTRY.pack_into(self._buf, victim, fp, cap, now)
        return victim, cap

    def close(self) -> None:
        """Unmap (and close the shared file); idempotent."""
        fd, self._fd = self._fd, -1
        try:
            self._buf.close()
        finally:
            if fd >= 0:
                os.close(fd)
