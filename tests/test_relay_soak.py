"""A sale through `flashgate serve --workers 2` with a relay to a real webhook receiver, while
SIGKILL strikes, once each and in turn: the relay, a gateway worker, the finalizer and the
embedded Redis server (restarted by serve on the same data dir, its AOF bringing the data
back). Shoppers retry with their key when an answer is lost or a 503; a quarter of the orders
are paid, the rest expire; the receiver refuses one delivery in ten.

Then, once every order is final: nothing lost, duplicated or oversold (loadtests/verify.py
and `flashgate audit`), and the receiver, deduplicated on `webhook-id`, holds for every order
exactly the final transitions of its record in Redis, in order, each under one event id that
carried the same body every time, and nothing for an order that does not exist.

CI runs a few hundred orders; the long one (`-m slow`) several thousand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.transport.streams import id_order
from loadtests.verify import Findings, check_records, check_skus
from tests.support.processes import Serve, flashgate, role_pid, server_pid
from tests.support.receiver import Receiver
from tests.test_faults import (
    FINAL,
    OUTAGE,
    Load,
    order_records,
    put_skus,
    serve_env,
    server_url,
    stop_and_check_gone,
    wait_settled,
    worker_pids,
)

pytestmark = pytest.mark.integration

WHSEC = "whsec_" + base64.b64encode(b"relay-soak-test-secret-32-bytes!").decode()


def kill(pid: int) -> int:
    os.kill(pid, signal.SIGKILL)
    return pid


def final_steps(url: str, skus: list[str]) -> dict[str, list[str]]:
    """Every order record's final transitions, in order, by order id."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        return {
            order_id: [h["to"] for h in json.loads(f["history"]) if h["to"] in FINAL]
            for sku in skus
            for order_id, f in order_records(client, sku)
        }


def received_steps(receiver: Receiver) -> dict[str, list[str]]:
    """What the receiver took, deduplicated on the event id: each order's events (but
    refund_needed) in commit order."""
    per_order: dict[str, list[tuple[tuple[int, int], str]]] = defaultdict(list)
    for event_id, body in receiver.received().items():
        event = json.loads(body)
        if event["event"] != "refund_needed":
            entry = id_order(event_id.rpartition("/")[2])
            per_order[event["order_id"]].append((entry, event["event"]))
    return {order: [e for _, e in sorted(events)] for order, events in per_order.items()}


def check_records_and_audit(s: Serve, data_dir: Path, load: Load, skus: list[str]) -> Findings:
    url = server_url(data_dir)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        wait_settled(client, skus, within_s=60)
        findings = Findings()
        check_skus(client, skus, findings)
        check_records(client, s.base, load.order_records(), load.payments, findings)
    assert findings.counts() == dict.fromkeys(findings.counts(), 0), findings
    audit = flashgate("audit", FLASHGATE_DATA_DIR=str(data_dir))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    return findings


class PacedLoad(Load):
    """Shoppers that pause before each request, so the sale lasts across the kills."""

    pause_s = 0.02

    async def create(self, c: httpx.AsyncClient, user: str, sku: str, key: str) -> Any:
        await asyncio.sleep(self.pause_s)
        return await super().create(c, user, sku, key)


async def more_202s(load: Load, n: int) -> None:
    seen = load.accepted + n
    await load.until(lambda: load.accepted >= seen, f"{seen} 202s", 60)


def started(s: Serve, what: str) -> int:
    """How many times a process of the kind logged that it started."""
    if what == "worker":
        return s.log.read_text().count("Application startup complete")
    return len(re.findall(rf'"msg":"{what} \S+ started', s.log.read_text()))


async def kill_and_wait_back(s: Serve, data_dir: Path, load: Load, what: str) -> int:
    """SIGKILL `what` (relay, worker, finalizer, redis), then wait until its replacement has
    started (for Redis: until a 202 again). Returns the pid killed."""
    if what == "redis":
        victim = kill(server_pid(data_dir))
        load.mark()
        await load.until(lambda: load.first_202_since is not None, "a 202 after the kill", 60)
        return victim
    before = started(s, what)
    victim = kill(min(worker_pids(s)) if what == "worker" else role_pid(s, what))
    await load.until(lambda: started(s, what) > before, f"a new {what}", 60)
    return victim


async def run_soak(
    data_dir: Path, *, between: int, concurrency: int, cold: int = 1
) -> dict[str, Any]:
    """Kill, once each, the relay, a gateway worker, the finalizer and Redis, each after
    `between` more 202s and once the last one has recovered. SKU "hot" sells out; `cold`
    SKUs (one events stream each, delivered side by side) never do."""
    receiver = Receiver(WHSEC)
    receiver.refuse_fraction = 0.1
    await receiver.start()
    env = serve_env(FLASHGATE_RELAY_URL=receiver.url, FLASHGATE_RELAY_SECRET=WHSEC)
    s = await asyncio.to_thread(Serve, data_dir, "--workers", "2", env=env)
    stock = {"hot": between, **{f"cold-{n}": 1_000_000 for n in range(cold)}}
    skus = sorted(stock)
    killed: dict[str, int] = {}
    try:
        await asyncio.to_thread(put_skus, s.base, stock)
        load = PacedLoad(s.base, skus, concurrency=concurrency, retry_lost=True)

        async def control(load: Load) -> None:
            for what in ("relay", "worker", "finalizer", "redis"):
                await more_202s(load, between)
                killed[what] = await kill_and_wait_back(s, data_dir, load, what)
            await more_202s(load, between)

        await load.run(control)
        bad = Counter(
            f"{a.status} {a.error}"
            for a in load.attempts
            if a.status and (a.status, a.error) not in OUTAGE
        )
        assert not bad, bad
        findings = await asyncio.to_thread(check_records_and_audit, s, data_dir, load, skus)
        expected = await asyncio.to_thread(final_steps, server_url(data_dir), skus)
        assert len(expected) >= 5 * between

        deadline = time.monotonic() + 90 + len(expected) / 100  # the backlog of the outages
        while received_steps(receiver) != expected:
            if time.monotonic() > deadline:
                got = received_steps(receiver)
                wrong = {o: (e, got.get(o)) for o, e in expected.items() if got.get(o) != e}
                extra = got.keys() - expected.keys()
                raise AssertionError(f"receiver != Redis: {list(wrong.items())[:5]}, {extra=}")
            await asyncio.sleep(0.25)
        assert all(len(bodies) == 1 for bodies in receiver.bodies().values())
        assert all(d.signed for d in receiver.deliveries)

        log = s.log.read_text()
        for role in ("relay", "finalizer"):
            assert f"{role} (pid {killed[role]}) killed by signal 9; restarting" in log
            assert role_pid(s, role) != killed[role]
        assert f"Child process [{killed['worker']}] died" in log
        assert log.count("embedded server restarted") == 1
        async with httpx.AsyncClient(base_url=s.base) as c:
            dead = (await c.get("/metrics")).text
        assert "flashgate_relay_dead_total 0.0" in dead.splitlines()
        statuses = Counter(steps[-1] for steps in expected.values())
        return {
            **load.summary(),
            "orders": dict(statuses),
            "deliveries": len(receiver.deliveries),
            "events": len(receiver.received()),
            "replays": findings.replays,
        }
    finally:
        if s.proc.poll() is None:
            await asyncio.to_thread(stop_and_check_gone, s)
        await receiver.stop()


@pytest.mark.timeout(120)
async def test_relay_soak_short(tmp_path: Path) -> None:
    figures = await run_soak(tmp_path / "data", between=60, concurrency=4)
    print(f"\nrelay soak: {json.dumps(figures)}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_relay_soak_long(tmp_path: Path) -> None:
    figures = await run_soak(tmp_path / "data", between=1500, concurrency=32, cold=4)
    print(f"\nrelay soak (long): {json.dumps(figures)}")
