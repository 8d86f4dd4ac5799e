"""The RabbitMQ target: one persistent message per event on a durable, bounded queue.

`start()` connects, opens a channel with publisher confirms and declares the queue durable
with `x-max-length` = `FLASHGATE_QUEUE_MAX`, `x-overflow: reject-publish` and a dead-letter
exchange (`<queue>.dead`, fanout, bound to the durable queue `<queue>.dead`): a full queue
refuses a new message (a nack) instead of dropping its oldest one. `deliver(event)` publishes
to the default exchange with the queue as routing key, `mandatory`, and waits for the
confirm: a nack or an unroutable return is `Refused`, as is a confirm that does not come
within `timeout_s`; a lost connection or channel, or a broker that cannot be reached, is
`Unreachable`, and the next `deliver` connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.connection import make_url

from gateway.settings import ConfigError
from gateway.workers.relay.events import Event
from gateway.workers.relay.target import Refused, Unreachable

CONTENT_TYPE = "application/json"
CLOSE_S = 1.0  # at most this long for a polite close of a connection given up on
# everything that says the connection or channel is gone, or was never there
_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
    RuntimeError,  # aiormq: "Connection closed" / "writer is None" on a dead transport
)
_UNREACHABLE: tuple[type[BaseException], ...] = (
    TimeoutError,
    *_LOST,
)  # at connect: a timeout sent nothing yet


class QueueMismatch(ConfigError):
    """The queue exists with other arguments than the relay declares; the message names both."""


def queue_arguments(queue: str, max_length: int) -> dict[str, Any]:
    """The arguments the relay declares its queue with."""
    return {
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": dead_letter_name(queue),
    }


def dead_letter_name(queue: str) -> str:
    """The dead-letter exchange and queue of `queue`."""
    return f"{queue}.dead"


class RabbitTarget:
    """Events to one RabbitMQ queue, each confirmed by the broker before `deliver` returns."""

    name = "rabbitmq"

    def __init__(self, url: str, queue: str, *, max_length: int, timeout_s: float) -> None:
        self.url = url
        self.queue = queue
        self.arguments = queue_arguments(queue, max_length)
        self.timeout_s = timeout_s
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect and declare the queues; raises Unreachable, or QueueMismatch when the queue
        exists with other arguments."""
        async with self._lock:
            await self._connect()

    async def deliver(self, event: Event) -> None:
        exchange = await self._exchange()
        message = aio_pika.Message(
            event.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            type=event.type,
            content_type=CONTENT_TYPE,
        )
        try:
            await exchange.publish(
                message, routing_key=self.queue, mandatory=True, timeout=self.timeout_s
            )
        except aiormq.exceptions.PublishError as exc:  # before DeliveryError: a subclass
            raise Refused(f"unroutable to queue {self.queue!r}: {exc.args[0]}") from None
        except aiormq.exceptions.DeliveryError:
            raise Refused(
                f"nack from queue {self.queue!r}: full (x-max-length"
                f" {self.arguments['x-max-length']}, reject-publish) or not stored"
            ) from None
        except TimeoutError:
            await self._drop()  # a confirm may still come on this channel: start afresh
            raise Refused(f"no confirm within {self.timeout_s} s") from None
        except _LOST as exc:
            await self._drop()
            raise Unreachable(f"connection to RabbitMQ lost: {exc!r}") from None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _exchange(self) -> AbstractExchange:
        """The default exchange of an open channel, connecting again when it is gone."""
        channel = self._channel
        if channel is None or channel.is_closed:
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    await self._drop()
                    await self._connect()
                channel = self._channel
        assert channel is not None
        return channel.default_exchange

    async def _connect(self) -> None:
        try:
            # held before connecting, so that a failed connect is closed by _drop: aio-pika
            # closes an unclosed connection from its finalizer, which needs a running loop
            self._connection = aio_pika.Connection(make_url(self.url))
            await self._connection.connect(timeout=self.timeout_s)
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self._declare(self._channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            await self._drop()
            raise QueueMismatch(self._mismatch(exc)) from None
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            await self._drop()
            if "ACCESS_REFUSED" not in str(exc):  # closed while starting or stopping
                raise Unreachable(f"RabbitMQ closed the connection: {exc}") from None
            raise ConfigError(f"RabbitMQ refused the relay's credentials: {exc}") from None
        except _UNREACHABLE as exc:
            await self._drop()
            raise Unreachable(f"RabbitMQ cannot be reached: {exc!r}") from None

    async def _declare(self, channel: AbstractChannel) -> None:
        dead = dead_letter_name(self.queue)
        exchange = await channel.declare_exchange(
            dead, aio_pika.ExchangeType.FANOUT, durable=True, timeout=self.timeout_s
        )
        dead_queue = await channel.declare_queue(dead, durable=True, timeout=self.timeout_s)
        await dead_queue.bind(exchange, timeout=self.timeout_s)
        await channel.declare_queue(
            self.queue, durable=True, arguments=self.arguments, timeout=self.timeout_s
        )

    def _mismatch(self, exc: aiormq.exceptions.ChannelPreconditionFailed) -> str:
        reason = exc.args[0] if exc.args else str(exc)
        declared = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return (
            f"RabbitMQ queue {self.queue!r} (or {dead_letter_name(self.queue)!r}) exists with"
            f" other arguments than the relay declares (durable, {declared}): {reason}."
            " Delete it or choose another FLASHGATE_RELAY_QUEUE"
        )

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), min(self.timeout_s, CLOSE_S))
