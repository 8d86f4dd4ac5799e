"""The webhook target against a real receiver (signature, refusals, an unreachable receiver),
the relay's group name, and trimming an events stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook

from gateway.workers.relay.events import Event
from gateway.workers.relay.loop import group_for
from gateway.workers.relay.target import Refused, Unreachable
from gateway.workers.relay.webhook import WebhookTarget
from gateway.workers.trim import trim_floor, trim_stream
from tests.support.receiver import Receiver
from tests.support.relaying import SECRET
from tests.support.state import BOTH_BACKENDS

EVENT = Event("sku-42/0/1-0", "CONFIRMED", b'{"event":"CONFIRMED","quantity":2}')


async def test_one_signed_post_per_event(receiver: Receiver) -> None:
    target = WebhookTarget(receiver.url, SECRET, timeout_s=2)
    await target.start()
    await target.deliver(EVENT)
    await target.deliver(EVENT)
    await target.close()
    first, second = receiver.deliveries
    assert first.signed and first.body == EVENT.body and first.id == EVENT.id
    assert first.headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(first.body, first.headers) == {
        "event": "CONFIRMED",
        "quantity": 2,
    }
    assert second.id == first.id  # the same id at every delivery


async def test_a_non_2xx_answer_or_a_timeout_after_sending_is_refused(receiver: Receiver) -> None:
    target = WebhookTarget(receiver.url, SECRET, timeout_s=0.2)
    receiver.refuse_every = 1
    with pytest.raises(Refused, match="HTTP 500"):
        await target.deliver(EVENT)
    receiver.refuse_every, receiver.hang_s = 0, 1.0
    with pytest.raises(Refused, match="no answer in time"):
        await target.deliver(EVENT)
    await target.close()


async def test_a_receiver_not_listening_is_unreachable(receiver: Receiver) -> None:
    target = WebhookTarget(receiver.url, SECRET, timeout_s=1)
    await receiver.stop()
    with pytest.raises(Unreachable):
        await target.deliver(EVENT)
    await receiver.start()
    await target.deliver(EVENT)  # the same port again
    assert [d.id for d in receiver.deliveries] == [EVENT.id]
    await target.close()
    nowhere = WebhookTarget("http://no-such-host.invalid/", SECRET, timeout_s=1)
    with pytest.raises(Unreachable):
        await nowhere.deliver(EVENT)
    await nowhere.close()


class Plain:
    """A bare HTTP/1.1 server on asyncio streams: answers every request `status` (with
    `headers`), keeps the connection open, counts connections and requests."""

    def __init__(self, status: int, headers: str = "") -> None:
        self.answer = f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n{headers}\r\n".encode()
        self.connections = self.requests = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                self.requests += 1
                writer.write(self.answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_events_share_one_kept_alive_connection() -> None:
    plain = Plain(204)
    target = WebhookTarget(await plain.start(), SECRET, timeout_s=2)
    for _ in range(5):
        await target.deliver(EVENT)
    await target.close()
    await plain.stop()
    assert (plain.connections, plain.requests) == (1, 5)


async def test_a_redirect_is_refused_not_followed(receiver: Receiver) -> None:
    plain = Plain(307, f"location: {receiver.url}\r\n")
    target = WebhookTarget(await plain.start(), SECRET, timeout_s=2)
    with pytest.raises(Refused, match="HTTP 307"):
        await target.deliver(EVENT)
    await target.close()
    await plain.stop()
    assert receiver.deliveries == []


def test_the_group_names_the_target_without_its_credentials() -> None:
    plain = group_for("webhook", "https://erp.example/hook")
    assert plain.startswith("relay:webhook:") and len(plain) == len("relay:webhook:") + 8
    assert group_for("webhook", "https://user:pw@erp.example/hook") == plain
    assert group_for("webhook", "https://erp.example/other") != plain


@BOTH_BACKENDS
async def test_trimming_never_removes_an_unacknowledged_entry(redis: Redis) -> None:
    stream = "fg:{s}:events"
    ids: list[Any] = [await redis.xadd(stream, {"event": str(i)}) for i in range(6)]
    await redis.xgroup_create(stream, "a", id="0")
    await redis.xgroup_create(stream, "b", id="0")
    assert await trim_stream(redis, stream) == 0  # groups handed nothing yet
    await _read(redis, stream, "a", 6)
    await redis.xack(stream, "a", *ids)
    assert await trim_stream(redis, stream) == 0  # b was handed nothing yet
    await _read(redis, stream, "b", 4)
    await redis.xack(stream, "b", ids[0], ids[2])  # ids[1] still unconfirmed
    assert await trim_floor(redis, stream) == ids[1].decode()
    assert await trim_stream(redis, stream) == 1
    await redis.xack(stream, "b", ids[1], ids[3])
    assert await trim_stream(redis, stream) == 3  # up to the last entry b was handed
    remaining: Any = await redis.xrange(stream)
    assert [e[0] for e in remaining] == ids[4:]


async def _read(redis: Redis, stream: str, group: str, count: int) -> None:
    await redis.xreadgroup(group, "c", {stream: ">"}, count=count)
