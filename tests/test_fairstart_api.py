"""Fair start through the HTTP API, `flashgate verify-draw`, a real `flashgate serve` and a real
finalizer killed mid-draw."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import httpx
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import draws, keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import DrawState
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer
from gateway.workers.finalizer import Finalizer
from tests.support.api import ADMIN, ADMIN_TOKEN, Client, create, order_body, put_sku
from tests.support.processes import Serve, flashgate
from tests.support.state import snapshot


async def prequeued_sku(client: Client, sku: str = "sku-42", **cfg: int) -> int:
    """A SKU whose sale starts in an hour, pre-queue open now; returns its start."""
    starts_at = int(time.time()) + 1800
    r = await put_sku(client, sku, starts_at=starts_at, prequeue_s=3600, **cfg)
    assert r.status_code == 201, r.text
    return starts_at


async def test_a_bad_prequeue_is_refused_and_changes_nothing(client: Client, redis: Redis) -> None:
    assert (await put_sku(client, starts_at=int(time.time()) + 60)).status_code == 201
    before = await snapshot(redis)
    starts = {"starts_at": int(time.time()) + 60}
    for bad in (
        {"prequeue_s": 60},  # no starts_at
        {**starts, "prequeue_s": -1},
        {**starts, "prequeue_s": 7 * 86_400 + 1},
        {**starts, "prequeue_s": "60"},
        {**starts, "prequeue_s": 1.5},
        {**starts, "prequeue_s": 60, "buckets": 2},
    ):
        r = await put_sku(client, **bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "invalid_request" and r.json()["message"]
    r = await put_sku(client, "other", prequeue_s=60)
    assert r.status_code == 400 and "starts_at" in r.json()["message"]
    assert await snapshot(redis) == before


async def test_prequeue_over_http(client: Client) -> None:
    starts_at = await prequeued_sku(client, per_user_limit=2)
    sku = (await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert sku["prequeue_s"] == 3600 and sku["draw"] == "pending"
    assert len(sku["draw_commitment"]) == 64 and "seed" not in json.dumps(sku)
    key = str(uuid.uuid4())
    first = await create(client, key)
    assert first.status_code == 202
    body = first.json()
    assert body["status"] == "QUEUED" and body["position"] is None
    assert body["opens_at"] == starts_at
    again = await create(client, key)
    assert (again.status_code, again.content) == (202, first.content)
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = await create(client, key, quantity=2)
    assert (reused.status_code, reused.json()["error"]) == (422, "idempotency_key_reused")
    assert (await create(client)).status_code == 202
    over = await create(client)
    assert (over.status_code, over.json()["error"]) == (409, "limit_exceeded")
    order = (await client.get(f"/api/v1/order/{body['order_id']}")).json()
    assert (order["status"], order["opens_at"]) == ("QUEUED", starts_at)


async def test_the_draw_route(client: Client, redis: Redis, settings: Settings) -> None:
    r = await client.get("/api/v1/admin/skus/nope/draw", headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (404, "unknown_sku")
    assert (await put_sku(client, "plain")).status_code == 201
    r = await client.get("/api/v1/admin/skus/plain/draw", headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (404, "no_draw")
    assert (await client.get("/api/v1/admin/skus/plain/draw")).status_code == 401
    await prequeued_sku(client, stock=3)
    commitment = (await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()[
        "draw_commitment"
    ]
    ids = [(await create(client, user_id=f"u{i}")).json()["order_id"] for i in range(8)]
    r = await client.get("/api/v1/admin/skus/sku-42/draw", headers=ADMIN)
    assert (r.status_code, r.json()["error"], r.json()["draw"]) == (409, "draw_pending", "pending")
    # the sale starts: moved to now; a finalizer draws
    r = await put_sku(client, stock=3, starts_at=int(time.time()) - 1, prequeue_s=3600)
    assert r.status_code == 200 and r.json()["draw_commitment"] == commitment
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    finalizer = Finalizer(redis, scripts, settings, name="f1")
    while await finalizer.step(block=False):
        pass
    r = await client.get("/api/v1/admin/skus/sku-42/draw", headers=ADMIN)
    assert r.status_code == 200
    drawn = r.json()
    assert set(drawn) == {"sku_id", "seed", "commitment", "orders"}
    assert drawn["commitment"] == commitment and drawn["sku_id"] == "sku-42"
    assert drawn["orders"] == draws.ranked(drawn["seed"], ids)
    held = [(await client.get(f"/api/v1/order/{o}")).json()["status"] for o in drawn["orders"]]
    assert held == ["HELD"] * 3 + ["REJECTED"] * 5


async def _drawn(redis: Redis, settings: Settings, n: int) -> list[str]:
    """SKU "s" with n pre-queued orders, drawn by a finalizer; their ids."""
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    inv = Inventory(redis, scripts, settings)
    ids = await _prequeue(inv, n)
    await _start(inv)
    finalizer = Finalizer(redis, scripts, settings, name="f1")
    while await finalizer.step(block=False):
        pass
    return ids


async def _prequeue(inv: Inventory, n: int, stock: int = 10) -> list[str]:
    cfg = SkuConfig(
        promotion_id="p",
        stock=stock,
        per_user_limit=1,
        starts_at=int(time.time()) + 1800,
        prequeue_s=3600,
    )
    await inv.configure_sku("s", cfg)
    ids = []
    for i in range(n):
        req = OrderRequest(user_id=f"u{i}", sku_id="s", quantity=1, promotion_id="p")
        _, body = await inv.create_order(req, str(uuid.uuid4()))
        ids.append(json.loads(body)["order_id"])
    return ids


async def _start(inv: Inventory, stock: int = 10) -> None:
    cfg = SkuConfig(
        promotion_id="p",
        stock=stock,
        per_user_limit=1,
        starts_at=int(time.time()) - 1,
        prequeue_s=3600,
    )
    await inv.configure_sku("s", cfg)


async def test_verify_draw_passes_on_a_real_draw_and_fails_on_a_tampered_one(
    redis: Redis, settings: Settings, tmp_path: Path
) -> None:
    await _drawn(redis, settings, 30)
    url = settings.redis_url or ""
    ok = flashgate("verify-draw", "s", REDIS_URL=url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verified" in ok.stdout and "30 order(s)" in ok.stdout
    sk = keys.SkuKeys("s")
    # a saved answer, checked offline against the commitment published before the sale
    seed = (await redis.hget(sk.sku, "draw_seed") or b"").decode()
    commitment = (await redis.hget(sk.sku, "draw_commitment") or b"").decode()
    orders = [o.decode() for o in await redis.lrange(sk.draw, 0, -1)]
    saved = tmp_path / "draw.json"
    answer = {"sku_id": "s", "seed": seed, "commitment": commitment, "orders": orders}
    saved.write_text(json.dumps(answer))
    offline = ("verify-draw", "s", "--file", str(saved), "--commitment")
    assert flashgate(*offline, commitment).returncode == 0
    wrong = flashgate(*offline, "0" * 64)
    assert wrong.returncode == 1 and "MISMATCH" in wrong.stdout
    assert "published before the sale, " + "0" * 64 in wrong.stdout, wrong.stdout
    alone = flashgate("verify-draw", "s", "--file", str(saved))  # only the draw's own commitment
    assert alone.returncode == 0 and "no --commitment" in alone.stdout, alone.stdout
    swapped = {**answer, "orders": [orders[1], orders[0], *orders[2:]]}
    saved.write_text(json.dumps(swapped))
    assert flashgate("verify-draw", "s", "--file", str(saved)).returncode == 1
    # tampered in Redis: two ranks swapped, then another seed
    await redis.lset(sk.draw, 0, orders[1])
    await redis.lset(sk.draw, 1, orders[0])
    bad = flashgate("verify-draw", "s", REDIS_URL=url)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout, bad.stdout
    await redis.lset(sk.draw, 0, orders[0])
    await redis.lset(sk.draw, 1, orders[1])
    assert flashgate("verify-draw", "s", REDIS_URL=url).returncode == 0
    await redis.hset(sk.sku, "draw_seed", "ab" * 32)
    bad = flashgate("verify-draw", "s", REDIS_URL=url)
    assert bad.returncode == 1 and "commitment" in bad.stdout
    await redis.hset(sk.sku, "draw_seed", seed)
    await redis.srem(sk.prequeue, orders[5])  # the draw ranked an order never pre-queued
    assert flashgate("verify-draw", "s", REDIS_URL=url).returncode == 1
    await redis.sadd(sk.prequeue, orders[5])
    missing = flashgate("verify-draw", "nope", REDIS_URL=url)
    assert missing.returncode == 2 and "no such SKU" in missing.stderr


def test_fair_start_end_to_end_through_serve(tmp_path: Path) -> None:
    """A real `flashgate serve`: pre-queue over HTTP, the start passes, its finalizer draws,
    `verify-draw --url` checks the draw the gateway reveals, the audit is clean."""
    serve = Serve(tmp_path / "data")
    try:
        base = serve.base
        starts_at = int(time.time()) + 3
        sku = {"promotion_id": "promo-1", "stock": 4, "per_user_limit": 1}
        r = httpx.put(
            f"{base}/api/v1/admin/skus/sku-42",
            json={**sku, "starts_at": starts_at, "prequeue_s": 600},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        early = []
        for i in range(12):
            r = httpx.post(
                f"{base}/api/v1/order/create",
                json=order_body(user_id=f"u{i}"),
                headers={"X-Idempotency-Key": str(uuid.uuid4())},
            )
            assert r.status_code == 202 and r.json()["opens_at"] == starts_at, r.text
            early.append(r.json()["order_id"])
        deadline = time.monotonic() + 30
        while True:
            r = httpx.get(f"{base}/api/v1/admin/skus/sku-42/draw", headers=ADMIN)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 409
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert int(time.time()) >= starts_at  # not before the start
        assert sorted(r.json()["orders"]) == sorted(early)
        out = flashgate("verify-draw", "sku-42", "--url", base, FLASHGATE_ADMIN_TOKEN=ADMIN_TOKEN)
        assert out.returncode == 0, out.stdout + out.stderr
        anonymous = flashgate("verify-draw", "sku-42", "--url", base, FLASHGATE_ADMIN_TOKEN="")
        assert anonymous.returncode == 2, anonymous.stdout + anonymous.stderr
        assert "set FLASHGATE_ADMIN_TOKEN" in anonymous.stderr, anonymous.stderr
        local = flashgate("verify-draw", "sku-42", "--data-dir", str(tmp_path / "data"))
        assert local.returncode == 0 and "12 order(s)" in local.stdout, local.stdout + local.stderr
        statuses = [
            httpx.get(f"{base}/api/v1/order/{o}").json()["status"] for o in r.json()["orders"]
        ]
        assert statuses == ["HELD"] * 4 + ["REJECTED"] * 8
        audit = flashgate("audit", "--data-dir", str(tmp_path / "data"))
        assert audit.returncode == 0, audit.stdout
    finally:
        serve.stop()


async def test_a_finalizer_killed_mid_draw_is_finished_by_another(
    redis: Redis, settings: Settings
) -> None:
    """SIGKILL of a real `flashgate finalizer` while it draws one order per script call; an
    in-process finalizer then finishes: every order decided once, stock exact."""
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    inv = Inventory(redis, scripts, settings)
    stock = 700
    ids = await _prequeue(inv, 2000, stock=stock)
    sk = keys.SkuKeys("s")
    env = {
        "REDIS_URL": settings.redis_url or "",
        "FLASHGATE_DRAW_BATCH": "1",
        "FLASHGATE_LOG_FORMAT": "text",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "finalizer",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not await redis.exists(sk.stream) or not await redis.xinfo_groups(sk.stream):
            assert time.monotonic() < deadline and proc.returncode is None
            await asyncio.sleep(0.05)
        await _start(inv, stock)
        while int(await redis.hget(sk.sku, "draw_cursor") or 0) < 50:
            assert time.monotonic() < deadline and proc.returncode is None
            await asyncio.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
    killed_at = int(await redis.hget(sk.sku, "draw_cursor") or 0)
    assert 50 <= killed_at < 2000, killed_at  # died mid-draw
    assert await redis.hget(sk.sku, "draw") == b"drawing"
    second = Drawer(inv.draws, settings)
    assert await second.draw("s") is DrawState.DONE
    assert second.decided == 2000 - killed_at
    view = await inv.draws.view("s")
    assert view is not None and view.orders == draws.ranked(view.seed, ids)
    held = 0
    for order_id in view.orders:
        history = json.loads((await redis.hget(keys.order_key(order_id) or "", "history")) or b"")
        assert len(history) == 2
        held += history[1]["to"] == "HELD"
    assert held == stock
    assert int(await redis.hget(sk.sku, "available") or -1) == 0
    # the killed finalizer's pending entries are claimed once idle; drained, the audit is clean
    finalizer = Finalizer(redis, scripts, settings.replace(finalizer_claim_idle_ms=0), name="f2")
    finalizer.claim_every_s = 0.0
    while await finalizer.step(block=False):
        pass
    assert int(await redis.hget(sk.sku, "backlog") or 0) == 0
