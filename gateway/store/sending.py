"""How the store sends to Redis: every failure leaves as BackendUnavailable, and an idempotent
script whose answer may have been lost is sent once more."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    TimeoutError as RedisTimeoutError,
)

from gateway.errors import BackendUnavailable, NotApplied
from gateway.settings import Settings
from gateway.transport.cluster import SlotMoving
from gateway.transport.connect import Client
from gateway.transport.durable import acked
from gateway.transport.replies import REDIS_FAILURES, NotSent, call
from gateway.transport.scripts import Arg, Executor, LuaScript


def maybe_sent(exc: BaseException | None) -> bool:
    """Could the failed command have run on the server with its answer lost?

    No for an answer the server gave (an error reply) and for a command that surely never
    left: a failed connect or an empty pool (redis-py's "Error N connecting to ...", "Timeout
    connecting to server", "No connection available."). Any other connection failure counts
    as maybe sent: resending is safe, answering "nothing was held" after a lost answer is not.
    """
    if isinstance(exc, NotSent) or not isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, OSError)
    ):
        return False
    text = str(exc)
    return "connecting to" not in text and "No connection available" not in text


class Sender:
    """The store's way to Redis: `redis` for commands, `client` for scripts (the multiplexed
    client when given), `acked` for what a 202 promises (with WAITAOF when the settings ask)."""

    def __init__(self, redis: Client, settings: Settings, fast: Executor | None = None) -> None:
        self.redis = redis
        self.fast = fast
        self.client: Executor = fast or redis
        self.acked: Executor = acked(settings, self.client)
        # True: replays write, so the WAITAOF after them covers what they answer for
        self.durable = self.acked is not self.client

    @staticmethod
    async def run(awaitable: Awaitable[Any]) -> Any:
        """`transport.call`, answering Any: redis-py's reply types are looser than its replies."""
        return await call(awaitable)

    async def script(self, script: LuaScript, ks: list[str], args: Sequence[Arg]) -> Any:
        """Run one script on the script client."""
        return await call(script(self.client, ks, args))

    async def resending(self, script: LuaScript, ks: list[str], args: Sequence[Arg]) -> Any:
        """`script` for an idempotent script, sent once more when its answer may have been lost.

        The script may have run and only its answer been lost. Sending it again with the same
        idempotency key (or payment_id) is safe: if the first ran, this one replays its answer;
        if not, this one decides. Either way one effect, and the caller learns which.
        """
        try:
            return await script(self.acked, ks, args)
        except REDIS_FAILURES as exc:  # what `transport.call` turns into BackendUnavailable
            return await self.resend(exc, script, ks, args)

    async def resend(
        self, exc: BaseException, script: LuaScript, ks: list[str], args: Sequence[Arg]
    ) -> Any:
        """After `script` failed with `exc`: sent once more if it may have run with its answer
        lost, else the failure as `NotApplied` (surely not run) or `BackendUnavailable`."""
        if isinstance(exc, (NotSent, SlotMoving)):
            raise NotApplied() from exc
        if not maybe_sent(exc):
            raise BackendUnavailable() from exc
        return await call(script(self.acked, ks, args))
