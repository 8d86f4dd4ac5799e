"""`flashgate serve` with a relay target: a sale's final events reach a real webhook receiver
and a real RabbitMQ queue, one per order after dedupe; a bad target is refused at start."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from gateway.settings import Settings
from tests.support.api import ADMIN, order_body
from tests.support.processes import Serve, flashgate, role_pid
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration

WHSEC = "whsec_" + base64.b64encode(b"relay-serve-test-secret-32-bytes").decode()
PAY = "pay-secret"
ORDERS, PAID = 5, 2


async def sale(base: str) -> dict[str, str]:
    """Five orders on SKU "hot", the first two paid: their final states are 2 CONFIRMED and,
    a second later (holds of 1 s), 3 EXPIRED. Returns order id -> the final state expected."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.put(
            "/api/v1/admin/skus/hot",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 10, "per_user_limit": 1},
        )
        assert r.status_code == 201, r.text
        expected: dict[str, str] = {}
        for i in range(ORDERS):
            r = await c.post(
                "/api/v1/order/create",
                json=order_body(user_id=f"u{i}", sku_id="hot"),
                headers={"X-Idempotency-Key": str(uuid.uuid4())},
            )
            assert r.status_code == 202, r.text
            order_id = r.json()["order_id"]
            expected[order_id] = "EXPIRED"
            if i < PAID:
                body = json.dumps({"order_id": order_id, "payment_id": f"pay-{i}"}).encode()
                sig = hmac.new(PAY.encode(), body, hashlib.sha256).hexdigest()
                r = await c.post("/api/v1/payment/confirm", content=body,
                                 headers={"X-Signature": sig})  # fmt: skip
                assert r.status_code == 202, r.text
                expected[order_id] = "CONFIRMED"
    return expected


def serve_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "FLASHGATE_RELAY_URL": url,
        "FLASHGATE_PAYMENT_SECRET": PAY,
        "FLASHGATE_HOLD_TTL_S": "1",
        **extra,
    }


async def until(what: str, check: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.2)
    return got


async def test_a_sale_reaches_the_webhook_once_per_final_state(tmp_path: Path) -> None:
    receiver = Receiver(WHSEC)
    await receiver.start()
    env = serve_env(receiver.url, FLASHGATE_RELAY_SECRET=WHSEC)
    serve = await asyncio.to_thread(Serve, tmp_path / "data", env=env)
    try:
        expected = await sale(serve.base)

        async def all_final() -> dict[str, str] | None:
            got = {}
            for body in receiver.received().values():
                event = json.loads(body)
                got[event["order_id"]] = event["event"]
            return got if len(got) == ORDERS else None

        assert await until("every final state at the receiver", all_final) == expected
        assert all(d.signed for d in receiver.deliveries)
        assert all(len(bodies) == 1 for bodies in receiver.bodies().values())
        assert all(i.startswith("hot/0/") for i in receiver.received())
        async with httpx.AsyncClient(base_url=serve.base) as c:
            text = (await c.get("/metrics")).text  # the relay's counts, through the gateway
        for event, n in (("CONFIRMED", PAID), ("EXPIRED", ORDERS - PAID)):
            line = f'flashgate_relay_delivered_total{{event="{event}",target="webhook"}} {n}.0'
            assert line in text.splitlines(), [x for x in text.splitlines() if "relay" in x]
        # the relay shares the metrics directory but is no gateway worker: one series each
        gateway = role_pid(serve, "gateway")
        for gauge in ("breaker_state", "rules_version", "worker_mode_queue_only"):
            series = [x for x in text.splitlines() if x.startswith(f"flashgate_{gauge}{{")]
            assert [x.split("}")[0] for x in series] == [f'flashgate_{gauge}{{pid="{gateway}"'], (
                series
            )

        async def caught_up() -> bool:  # the relay's lag, written by it, read by the gateway
            async with httpx.AsyncClient(base_url=serve.base) as c:
                lines = (await c.get("/metrics")).text.splitlines()
            return any(x.startswith("flashgate_relay_lag{") and x.endswith(" 0.0") for x in lines)

        await until("the relay's lag at 0 in the gateway's /metrics", caught_up)
        assert "HTTP Request: POST" not in serve.log.read_text()  # no log line per delivery
    finally:
        await asyncio.to_thread(serve.stop)
        await receiver.stop()


async def test_a_relay_killed_under_serve_resumes_what_it_held_at_once(tmp_path: Path) -> None:
    """serve starts a killed relay again under its old consumer name: it delivers the entries
    its predecessor held without waiting for them to look idle (2 minutes here)."""
    receiver = Receiver(WHSEC)
    receiver.hang_s = 0.5  # the relay holds its batch while the first answer is slow
    await receiver.start()
    env = serve_env(
        receiver.url, FLASHGATE_RELAY_SECRET=WHSEC, FLASHGATE_FINALIZER_CLAIM_IDLE_MS="120000"
    )
    serve = await asyncio.to_thread(Serve, tmp_path / "data", env=env)
    try:
        expected = await sale(serve.base)

        async def holding() -> bool:
            return receiver.requests >= 1

        await until("a delivery under way", holding)
        killed = role_pid(serve, "relay")
        os.kill(killed, signal.SIGKILL)
        receiver.hang_s = 0.0

        async def all_final() -> dict[str, str] | None:
            got = {json.loads(b)["order_id"]: json.loads(b)["event"] for b in
                   receiver.received().values()}  # fmt: skip
            return got if len(got) == ORDERS else None

        assert await until("every final state, well within the claim idle time", all_final,
                           timeout_s=30) == expected  # fmt: skip
        assert f"relay (pid {killed}) killed by signal 9" in serve.log.read_text()
        assert all(len(bodies) == 1 for bodies in receiver.bodies().values())
    finally:
        await asyncio.to_thread(serve.stop)
        await receiver.stop()


async def test_a_sale_reaches_the_rabbitmq_queue(tmp_path: Path, rabbitmq_url: str) -> None:
    queue = f"orders-{uuid.uuid4().hex[:8]}"
    env = serve_env(rabbitmq_url, FLASHGATE_RELAY_QUEUE=queue)
    serve = await asyncio.to_thread(Serve, tmp_path / "data", env=env)
    try:
        expected = await sale(serve.base)
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            q = await channel.get_queue(queue)  # declared by the relay, durable
            got: dict[str, str] = {}
            ids: set[str] = set()

            async def drained() -> bool:
                while (message := await q.get(no_ack=True, fail=False)) is not None:
                    event = json.loads(message.body)
                    assert message.type == event["event"]
                    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                    ids.add(message.message_id or "")
                    got[event["order_id"]] = event["event"]
                return len(got) == ORDERS

            await until("every final state in the queue", drained)
        assert got == expected
        assert len(ids) == ORDERS and all(i.startswith("hot/0/") for i in ids)
    finally:
        await asyncio.to_thread(serve.stop)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLASHGATE_RELAY_URL": "ftp://erp.example/x"}, "FLASHGATE_RELAY_URL must be"),
        ({"FLASHGATE_RELAY_URL": "https://erp.example/x"}, "FLASHGATE_RELAY_SECRET is required"),
    ],
)
def test_a_bad_target_stops_the_relay_at_start(env: dict[str, str], message: str) -> None:
    run = flashgate("relay", **env)
    assert run.returncode == 2
    assert message in run.stderr


def test_the_replay_command_runs_against_the_target(settings: Settings) -> None:
    run = flashgate(
        "relay", "--replay-dead", "--sku", "nothing-here",
        REDIS_URL=settings.redis_url or "", FLASHGATE_RELAY_URL="http://127.0.0.1:9/hook",
        FLASHGATE_RELAY_SECRET=WHSEC,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "0 relay dead letter(s) sent again"
