"""Finalizer and sweeper as real processes: killed mid-batch, and inside `flashgate serve`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer
from tests.support.api import ADMIN
from tests.support.processes import Serve, flashgate

pytestmark = pytest.mark.integration


def start_finalizer(redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "FLASHGATE_FINALIZER_BATCH": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "finalizer"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_finalizer_killed_mid_batch_and_another_completes(
    redis: Redis, settings: Settings, redis_url: str
) -> None:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    inv = Inventory(redis, scripts, settings)
    await inv.configure_sku("k", SkuConfig(promotion_id="p", stock=2000, per_user_limit=1))
    total = 3000
    for i in range(total):
        req = OrderRequest(user_id=f"u{i}", sku_id="k", quantity=1, promotion_id="p")
        await inv.create_order(req, str(uuid.uuid4()), queue_only=True)
    sk = keys.SkuKeys("k")
    group = keys.FINALIZER_GROUP

    async def backlog() -> int:
        return int(await redis.hget(sk.sku, "backlog") or 0)

    pending = 0
    for _ in range(3):  # a kill that lands between two batches leaves nothing pending: again
        start = await backlog()
        proc = start_finalizer(redis_url)
        deadline = time.monotonic() + 30
        while True:  # until it has applied a few batches
            if await backlog() <= start - 300 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        pending = (await redis.xpending(sk.stream, group))["pending"]
        if pending:
            break
    assert pending > 0, "the finalizer was never killed in the middle of a batch"
    assert 0 < await backlog() < total

    survivor = Finalizer(redis, scripts, settings.replace(finalizer_claim_idle_ms=0))
    while await survivor.step(block=False):
        pass
    assert await backlog() == 0
    assert (await redis.xpending(sk.stream, group))["pending"] == 0
    row = await inv.audit_sku("k")
    assert row is not None and row.breaches() == []
    assert {st: n for st, (n, _) in row.orders.items()} == {"HELD": 2000, "REJECTED": 1000}
    assert (row.held, row.available) == (2000, 0)
    rejected = [f for _, f in await redis.xrange(sk.events) if f[b"event"] == b"REJECTED"]
    assert len(rejected) == len({f[b"order_id"] for f in rejected}) == 1000  # each once


SECRET = "serve-payment-secret"


def test_serve_finalizes_payments_and_expires_unpaid_holds(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s = Serve(
        data_dir,
        "--hold-ttl-s",
        "2",
        "--sweep-interval-ms",
        "200",
        env={"FLASHGATE_PAYMENT_SECRET": SECRET},
    )
    try:
        with httpx.Client(base_url=s.base, timeout=10) as c:
            c.put(
                "/api/v1/admin/skus/e",
                headers=ADMIN,
                json={"promotion_id": "promo-1", "stock": 1, "per_user_limit": 1},
            )

            def order(user: str) -> httpx.Response:
                body = {"user_id": user, "sku_id": "e", "quantity": 1, "promotion_id": "promo-1"}
                headers = {"X-Idempotency-Key": str(uuid.uuid4())}
                return c.post("/api/v1/order/create", json=body, headers=headers)

            def wait_status(order_id: str, status: str) -> dict[str, object]:
                deadline = time.monotonic() + 15
                while True:
                    view: dict[str, object] = c.get(f"/api/v1/order/{order_id}").json()
                    if view["status"] == status or time.monotonic() > deadline:
                        return view
                    time.sleep(0.05)

            unpaid = order("a").json()["order_id"]
            assert order("b").json()["error"] == "sold_out"
            expired = wait_status(unpaid, "EXPIRED")  # the sweeper inside serve
            assert [h["to"] for h in expired["history"]] == ["HELD", "EXPIRED"]  # type: ignore[attr-defined]
            paid = order("b").json()["order_id"]  # the stock was sold again
            body = json.dumps({"order_id": paid, "payment_id": "pay-b"}).encode()
            sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            r = c.post("/api/v1/payment/confirm", content=body, headers={"X-Signature": sig})
            assert r.status_code == 202
            confirmed = wait_status(paid, "CONFIRMED")  # the finalizer inside serve
            assert [h["to"] for h in confirmed["history"]] == ["HELD", "CONFIRMED"]  # type: ignore[attr-defined]
            sku = c.get("/api/v1/admin/skus/e", headers=ADMIN).json()
            assert (sku["available"], sku["held"], sku["sold"]) == (0, 0, 1)
        audit = flashgate("audit", "--data-dir", str(data_dir))
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "CONFIRMED:1 EXPIRED:1" in audit.stdout
    finally:
        assert s.stop() == 0
