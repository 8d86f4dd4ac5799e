"""What comes back from Redis: reply values, and the failures that stand for an outage.

A failure on the order path leaves the transport as BackendUnavailable (`call`); NotSent marks
the one kind that is safe to resend, a command that never reached a server.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    RedisClusterException,
    RedisError,
)

from gateway.errors import BackendUnavailable

T = TypeVar("T")

# What a Redis outage raises: redis-py's errors, its cluster client's (not RedisError
# subclasses: "All slots are not covered", no node reachable) and socket errors it did not wrap.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)


async def call(awaitable: Awaitable[T]) -> T:
    """Await one Redis operation; any Redis or socket failure leaves as BackendUnavailable."""
    try:
        return await awaitable
    except REDIS_FAILURES as exc:  # OSError: a socket error redis-py did not wrap
        raise BackendUnavailable() from exc


def text(value: bytes | str) -> str:
    """A reply value as str (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


class NotSent(RedisConnectionError):
    """The command surely never reached the server (no connection could be made)."""
