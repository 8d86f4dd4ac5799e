"""The RabbitMQ target against a real broker (tests/support/rabbitmq.py): properties and body
of each message, the queue's declared arguments, a full queue that refuses (never drops its
oldest), a stopped broker (Unreachable, bounded by the timeout), a restarted one (the same
target delivers again, persistent messages survive) and a queue declared otherwise before."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from redis.asyncio import Redis
from yarl import URL

from gateway.ops.embedded import free_port
from gateway.schemas import SkuConfig
from gateway.settings import ConfigError, Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.relay.events import Event
from gateway.workers.relay.loop import Relay
from gateway.workers.relay.rabbitmq import QueueMismatch, RabbitTarget
from gateway.workers.relay.target import Refused, Unreachable
from tests.support import rabbitmq as rabbitmq_support
from tests.support.rabbitmq import BrokerMissing, RabbitBroker
from tests.support.relaying import until

pytestmark = pytest.mark.integration
TIMEOUT_S = 2.0
MakeTarget = Callable[..., Awaitable[RabbitTarget]]


def event(n: int) -> Event:
    body = f'{{"event":"order.confirmed","order_id":"o{n}","quantity":{n}}}'.encode()
    return Event(f"sku-1/0/{n}-0", "order.confirmed", body)


@pytest.fixture
def queue() -> str:
    return f"fg-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def channel(rabbitmq_url: str) -> AsyncIterator[AbstractChannel]:
    """A channel of the test's own, to look at what the target did."""
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def make_target(rabbitmq_url: str, queue: str) -> AsyncIterator[MakeTarget]:
    """make_target(**overrides) -> a started RabbitTarget on the test's queue; closed after."""
    made: list[RabbitTarget] = []

    async def make(start: bool = True, **overrides: object) -> RabbitTarget:
        options: dict[str, object] = {"max_length": 1000, "timeout_s": TIMEOUT_S}
        options.update(overrides)
        target = RabbitTarget(
            str(options.pop("url", rabbitmq_url)),
            queue,
            **options,  # type: ignore[arg-type]
        )
        made.append(target)
        if start:
            await target.start()
        return target

    yield make
    for target in made:
        await target.close()


async def drain(channel: AbstractChannel, queue: str) -> list[AbstractIncomingMessage]:
    """Every message of `queue`, in order, acknowledged."""
    declared = await channel.declare_queue(queue, passive=True)
    found = []
    while (message := await declared.get(fail=False, timeout=5)) is not None:
        await message.ack()
        found.append(message)
    return found


def restartable(broker: RabbitBroker | None) -> RabbitBroker:
    if broker is None:
        pytest.skip("FLASHGATE_TEST_RABBITMQ_URL: an existing broker is not restarted by tests")
    return broker


async def test_messages_carry_the_event(
    make_target: MakeTarget, channel: AbstractChannel, queue: str
) -> None:
    target = await make_target()
    for n in range(3):
        await target.deliver(event(n))
    got = await drain(channel, queue)
    assert [m.body for m in got] == [event(n).body for n in range(3)]
    for n, message in enumerate(got):
        assert message.message_id == event(n).id
        assert message.type == "order.confirmed"
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.routing_key == queue
        assert message.exchange == ""


async def test_queue_is_declared_durable_bounded_with_dead_letters(
    make_target: MakeTarget,
    channel: AbstractChannel,
    queue: str,
    rabbitmq_broker: RabbitBroker | None,
) -> None:
    await make_target(max_length=7)
    # an equivalent declaration passes; RabbitMQ refuses any other one (see the mismatch test)
    arguments: dict[str, Any] = {
        "x-max-length": 7,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": f"{queue}.dead",
    }
    await channel.declare_queue(queue, durable=True, arguments=arguments)
    await channel.declare_exchange(f"{queue}.dead", passive=True)
    await channel.declare_queue(f"{queue}.dead", passive=True)
    if rabbitmq_broker is not None:
        info = rabbitmq_broker.queue_info(queue)
        assert info["durable"] is True
        assert info["arguments"] == arguments


async def test_a_full_queue_refuses_and_keeps_the_oldest(
    make_target: MakeTarget, channel: AbstractChannel, queue: str
) -> None:
    target = await make_target(max_length=3)
    for n in range(3):
        await target.deliver(event(n))
    for n in (3, 4):
        with pytest.raises(Refused, match="nack.*full"):
            await target.deliver(event(n))
    got = await drain(channel, queue)
    assert [m.message_id for m in got] == [event(n).id for n in range(3)]  # no drop-head
    await target.deliver(event(5))  # room again: the same target goes on
    assert [m.message_id for m in await drain(channel, queue)] == [event(5).id]


async def test_an_unroutable_message_is_refused(
    make_target: MakeTarget, channel: AbstractChannel, queue: str
) -> None:
    target = await make_target()
    await channel.queue_delete(queue)
    with pytest.raises(Refused, match="unroutable"):
        await target.deliver(event(1))


async def test_a_queue_declared_otherwise_is_named_at_start(
    make_target: MakeTarget, channel: AbstractChannel, queue: str
) -> None:
    await channel.declare_queue(queue, durable=True, arguments={"x-max-length": 5})
    with pytest.raises(QueueMismatch) as caught:
        await make_target(max_length=1000)
    message = str(caught.value)
    assert repr(queue) in message and "x-max-length" in message and "PRECONDITION" in message


async def test_no_broker_is_unreachable_at_start(make_target: MakeTarget) -> None:
    target = await make_target(start=False, url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    with pytest.raises(Unreachable):
        await target.start()
    with pytest.raises(Unreachable):
        await target.deliver(event(1))


async def test_a_failed_connect_is_closed_not_left_to_the_finalizer(
    make_target: MakeTarget,
) -> None:
    """aio-pika closes a connection left open from its finalizer by scheduling a task, which
    fails (an unawaited coroutine) when the loop is not running then; and the log record of
    the failure keeps the connection alive until some later test. A failed connect is closed."""
    port = free_port()
    target = await make_target(start=False, url=f"amqp://guest:guest@127.0.0.1:{port}/")
    for _ in range(3):
        with pytest.raises(Unreachable):
            await target.start()
    gc.collect()
    left_open = [
        o
        for o in gc.get_objects()
        if isinstance(o, aio_pika.Connection) and o.url.port == port and not o.is_closed
    ]
    assert left_open == []


async def test_wrong_credentials_are_named_at_start(
    make_target: MakeTarget, rabbitmq_url: str
) -> None:
    url = str(URL(rabbitmq_url).with_user("fg-nobody").with_password("wrong"))
    with pytest.raises(ConfigError, match="credentials"):
        await make_target(url=url)


def test_a_missing_broker_names_ci_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rabbitmq_support, "LIB_BIN", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerMissing, match=r"\.ci/run"):
        RabbitBroker(tmp_path)


async def test_a_stopped_broker_is_unreachable_within_the_timeout(
    make_target: MakeTarget, rabbitmq_broker: RabbitBroker | None
) -> None:
    broker = restartable(rabbitmq_broker)
    target = await make_target()
    await target.deliver(event(1))
    with broker.stopped():
        for n in (2, 3):  # the lost connection, then a connection refused
            began = time.monotonic()
            with pytest.raises(Unreachable):
                await target.deliver(event(n))
            assert time.monotonic() - began < TIMEOUT_S + 1
        fresh = await make_target(start=False)
        with pytest.raises(Unreachable):
            await fresh.start()


async def test_after_a_restart_the_target_reconnects_and_messages_survive(
    make_target: MakeTarget,
    queue: str,
    rabbitmq_url: str,
    rabbitmq_broker: RabbitBroker | None,
) -> None:
    broker = restartable(rabbitmq_broker)
    target = await make_target()
    for n in range(3):
        await target.deliver(event(n))
    with broker.stopped():
        pass
    try:  # the same target connects again, at worst after reporting the lost connection
        await target.deliver(event(3))
    except Unreachable:
        await target.deliver(event(3))
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        got = await drain(await connection.channel(), queue)
    assert [m.message_id for m in got] == [event(n).id for n in range(4)]


async def test_a_relay_started_before_its_broker_waits_then_delivers(
    queue: str,
    rabbitmq_url: str,
    rabbitmq_broker: RabbitBroker | None,
    redis: Redis,
    settings: Settings,
) -> None:
    """A broker not up yet when the relay starts: the relay keeps trying (no exit, nothing
    dead-lettered), then delivers once the broker is there."""
    broker = restartable(rabbitmq_broker)
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    sk = keys.SkuKeys("sa")
    inventory = Inventory(redis, scripts, settings)
    await inventory.configure_sku("sa", SkuConfig(promotion_id="p", stock=1, per_user_limit=1))
    entry_id = await redis.xadd(
        sk.events, {"event": "CONFIRMED", "order_id": "o1.sa", "quantity": "1", "at": "1"}
    )
    target = RabbitTarget(rabbitmq_url, queue, max_length=10, timeout_s=2)
    relay = Relay(redis, scripts, settings.replace(relay_url=rabbitmq_url), target, backoff_s=0.05)
    await asyncio.to_thread(broker.stop)
    try:
        running = asyncio.create_task(relay.run())
        await asyncio.sleep(0.5)
        assert not running.done()  # waiting for the target, not gone
    finally:
        await asyncio.to_thread(broker.start)
    try:
        await until(lambda: relay.delivered == 1, timeout_s=30)
        assert relay.dead == 0
    finally:
        relay.stop()
        await asyncio.wait_for(running, 10)
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        got = await drain(await connection.channel(), queue)
    assert [m.message_id for m in got] == [f"sa/0/{entry_id.decode()}"]
