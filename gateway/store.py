"""The Redis client boundary: how the gateway connects, and how Redis failures become errors.

On the order path a retried script could hold stock twice, so the client never retries by
itself: every command runs once, within a deadline (`FLASHGATE_REDIS_TIMEOUT_MS`). A caller
that wants to try again sends the same idempotency key, which makes the retry a replay.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.errors import BackendUnavailable

T = TypeVar("T")


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def create_client(settings: Settings, url: str | None = None) -> Redis:
    """A client for `url` (default `settings.redis_url`): no retries, a per-call deadline, a
    bounded pool whose waiters also give up at the deadline."""
    target = url or settings.redis_url
    if not target:
        raise ValueError("no Redis URL: set REDIS_URL or run `flashgate serve`")
    timeout = settings.redis_timeout_ms / 1000
    pool = BlockingConnectionPool.from_url(
        target,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry(),
        health_check_interval=0,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


async def call(awaitable: Awaitable[T]) -> T:
    """Await one Redis operation; any Redis or socket failure leaves as BackendUnavailable."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:  # OSError: a socket error redis-py did not wrap
        raise BackendUnavailable() from exc


def text(value: bytes | str) -> str:
    """A reply value as str (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value
