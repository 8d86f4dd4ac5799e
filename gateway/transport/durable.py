"""Durable writes: each write followed by WAITAOF, so a 202 is given only for what is on disk
(`FLASHGATE_WAITAOF_LOCAL`) or on enough replicas (`FLASHGATE_WAITAOF_REPLICAS`)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

from gateway.settings import Settings
from gateway.transport.cluster import ClusterMux
from gateway.transport.wire import Multiplexed


class NotDurable(RedisError):
    """The write was applied, but the server did not confirm it on disk (or on enough
    replicas) within the deadline: it may be lost on a power failure."""


class AckedWrites:
    """Runs commands as `execute_command` like the client it wraps, each followed in the same
    round trip by `WAITAOF <local> <replicas> <timeout>` (Redis/Valkey >= 7.2): the reply comes
    back only once the write is in the local AOF on disk (`local` 1) and/or in the AOF of
    `replicas` replicas. On the multiplexed client one WAITAOF closes each write, shared by
    every command of the event-loop tick (a group commit); on the pool the two go in one
    pipeline. Fewer acknowledgements than asked raise NotDurable.
    """

    def __init__(
        self,
        client: Any,
        *,
        local: int,
        replicas: int,
        timeout_ms: int,  # Multiplexed | ClusterMux | Redis | RedisCluster
    ) -> None:
        self.client = client
        self.local = local
        self.replicas = replicas
        self.barrier = ("WAITAOF", local, replicas, max(1, timeout_ms))

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        if isinstance(self.client, (Multiplexed, ClusterMux)):
            reply, acks = await self.client.execute_with_barrier(
                self.barrier, *args, after_reply=self.replicas > 0
            )
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*args)
                pipe.execute_command(*self.barrier)
                reply, acks = await pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acks, Exception):
                raise acks
        if isinstance(acks, Exception):
            raise acks
        if int(acks[0]) < self.local or int(acks[1]) < self.replicas:
            raise NotDurable(
                f"WAITAOF: fsynced on {int(acks[0])} local and {int(acks[1])} replica(s), "
                f"{self.local} and {self.replicas} required"
            )
        return reply


def acked(settings: Settings, client: Any) -> Any:
    """`client`, or `client` wrapped in AckedWrites when the settings ask for durable writes
    (FLASHGATE_WAITAOF_LOCAL / _REPLICAS): what a 202 promises runs on this."""
    if not (settings.waitaof_local or settings.waitaof_replicas):
        return client
    return AckedWrites(
        client,
        local=settings.waitaof_local,
        replicas=settings.waitaof_replicas,
        # answered by the server before the client's deadline gives up on it
        timeout_ms=settings.redis_timeout_ms // 2,
    )
