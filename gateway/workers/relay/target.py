"""What the relay asks of a target (a webhook receiver, a RabbitMQ queue).

`deliver(event)` returns once the target confirmed the event (a 2xx answer, a publisher
confirm). It raises `Refused` when the target answered and did not take it (a non-2xx answer,
a nack, a timeout after sending): that uses up one of the event's attempts. It raises
`Unreachable` when the event surely did not reach the target (connection refused, broker down):
that uses up none, the relay keeps trying with its backoff capped, so a target that is down
for a while dead-letters nothing.
"""

from __future__ import annotations

from typing import Protocol

from gateway.workers.relay.events import Event


class Refused(Exception):
    """The target answered and did not take the event; the message says why."""


class Unreachable(Exception):
    """The event did not reach the target; the message says why."""


class Target(Protocol):
    name: str  # for metrics and logs: "webhook" or "rabbitmq"

    async def start(self) -> None:
        """Connect (and, for a broker, declare what the target needs); raises Unreachable."""

    async def deliver(self, event: Event) -> None:
        """Deliver one event; returns once the target confirmed it."""

    async def close(self) -> None:
        """Release connections; idempotent."""
