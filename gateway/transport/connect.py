"""The Redis client factory: how the gateway connects (the general client, the order path's
multiplexed one, and the ops reads' own batch client).

On the order path a retried script could hold stock twice, so the client never retries by
itself: every command runs once, within a deadline (`FLASHGATE_REDIS_TIMEOUT_MS`). A caller
that wants to try again sends the same idempotency key, which makes the retry a replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.settings import Settings
from gateway.transport.cluster import ClusterMux
from gateway.transport.wire import Multiplexed

READS_TIMEOUT_S = 10.0  # the ops reads' deadline per call, at least

# The general client: one server's, or a cluster's (`FLASHGATE_REDIS_CLUSTER=1`).
Client = Redis | RedisCluster


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def create_client(settings: Settings, url: str | None = None) -> Client:
    """A client for `url` (default `settings.redis_url`): no retries, a per-call deadline, a
    bounded pool whose waiters also give up at the deadline. In cluster mode a cluster client
    that follows MOVED and ASK (a redirected command did not run, so following it is safe)
    and never resends after a connection failure."""
    target = url or settings.redis_url
    if not target:
        raise ValueError("no Redis URL: set REDIS_URL or run `flashgate serve`")
    timeout = settings.redis_timeout_ms / 1000
    if settings.redis_cluster:
        return RedisCluster.from_url(
            target,
            max_connections=settings.redis_max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=no_retry(),
            require_full_coverage=True,
        )
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


def create_script_client(
    settings: Settings, url: str | None = None
) -> Multiplexed | ClusterMux | None:
    """The order path's client: the multiplexed one (`FLASHGATE_REDIS_CLIENT=mux`, the
    default; one per cluster node in cluster mode), or None to run scripts on the general
    client."""
    target = url or settings.redis_url
    if settings.redis_client != "mux" or not target:
        return None
    if settings.redis_cluster:
        return ClusterMux(target, timeout_s=settings.redis_timeout_ms / 1000)
    return Multiplexed(target, timeout_s=settings.redis_timeout_ms / 1000)


class Batch(Protocol):
    """Many commands in one round trip (per node): `Multiplexed`, `ClusterMux` or
    `PipelineBatch`. Replies in order, a command's failure (its exception) in its place."""

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    async def aclose(self) -> None: ...


class PipelineBatch:
    """`Batch` on the general client (`FLASHGATE_REDIS_CLIENT=pool`): one redis-py pipeline.
    Does not own the client."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def aclose(self) -> None:
        return None


def create_reader(settings: Settings, redis: Client, url: str | None = None) -> Batch:
    """The ops reads' client (figures for /metrics, the console, `flashgate status`): a
    multiplexed connection of its own, so a pass over every SKU never queues the order path's
    commands behind its replies; on the general client when the multiplexed one is off."""
    target = url or settings.redis_url
    if settings.redis_client != "mux" or not target:
        return PipelineBatch(redis)
    # a reading is thousands of calls in one write: the last reply comes long after the first
    timeout_s = max(settings.redis_timeout_ms / 1000, READS_TIMEOUT_S)
    if settings.redis_cluster:
        return ClusterMux(target, timeout_s=timeout_s)
    return Multiplexed(target, timeout_s=timeout_s)
