"""Cluster mode end to end: two `flashgate serve` instances (different ports, each with its
own finalizer and sweeper) on one real 3-primary cluster, over real sockets; and a slot
moving between nodes in the middle of a sale."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot

from gateway.errors import BackendUnavailable
from gateway.ops.localcluster import LocalCluster
from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.cluster import ClusterMux
from gateway.transport.connect import create_client, create_script_client
from gateway.transport.scripts import ScriptRegistry
from tests.support.api import ADMIN, order_body
from tests.support.processes import Serve, alive, descendants, flashgate, wait_gone

SECRET = "cluster-payment-secret"
pytestmark = pytest.mark.integration


@pytest.fixture
def instances(cluster_url: str, tmp_path: Path) -> Iterator[tuple[Serve, Serve]]:
    import redis

    flush = redis.RedisCluster.from_url(cluster_url)
    flush.flushall()
    flush.close()
    env = {
        "REDIS_URL": cluster_url,
        "FLASHGATE_REDIS_CLUSTER": "1",
        "FLASHGATE_PAYMENT_SECRET": SECRET,
        "FLASHGATE_SWEEP_INTERVAL_MS": "200",
    }
    a = Serve(tmp_path / "a" / "data", env=env)
    try:
        b = Serve(tmp_path / "b" / "data", env=env)
    except BaseException:
        a.stop()
        raise
    yield a, b
    for s in (a, b):
        if s.proc.poll() is None:
            s.stop()


def signed(body: bytes) -> dict[str, str]:
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Signature": sig, "Content-Type": "application/json"}


async def post_order(c: httpx.AsyncClient, base: str, key: str, **fields: object) -> httpx.Response:
    """One shopper's order, sent again with the same key after a 503 (as the contract asks:
    at the very end of a bucketed sale, stock still moving is a 503, not a sold_out)."""
    for _ in range(20):
        r = await c.post(
            f"{base}/api/v1/order/create",
            json=order_body(**fields),
            headers={"X-Idempotency-Key": key},
        )
        if r.status_code != 503:
            break
        await asyncio.sleep(float(r.headers["retry-after"]) / 10)
    return r


async def wait_for(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def test_two_instances_on_a_cluster(instances: tuple[Serve, Serve], cluster_url: str) -> None:
    a, b = instances
    asyncio.run(two_instances(a, b))
    out = flashgate("audit", REDIS_URL=cluster_url, FLASHGATE_REDIS_CLUSTER="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hot" in out.stdout and "queued" in out.stdout
    tree = descendants(a.proc.pid) | descendants(b.proc.pid)
    assert a.stop() == 0 and b.stop() == 0
    assert wait_gone(tree) == set()
    assert not any(alive(p) for p in tree)


async def two_instances(a: Serve, b: Serve) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        r = await c.put(
            f"{a.base}/api/v1/admin/skus/hot",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 60, "per_user_limit": 1, "buckets": 3},
        )
        assert r.status_code == 201, r.text
        # a stampede split over both instances: the bucketed SKU sells out to the last unit
        answers = await asyncio.gather(
            *(
                post_order(c, (a, b)[i % 2].base, str(uuid.uuid4()), user_id=f"u{i}", sku_id="hot")
                for i in range(400)
            )
        )
        codes = Counter((r.status_code, r.json().get("error")) for r in answers)
        assert codes == {(202, None): 60, (409, "sold_out"): 340}
        view = (await c.get(f"{b.base}/api/v1/admin/skus/hot", headers=ADMIN)).json()
        assert (view["stock"], view["available"], view["held"], view["sold"]) == (60, 0, 60, 0)
        held = [r.json()["order_id"] for r in answers if r.status_code == 202]

        # one key sent to both instances at once: one order, replayed byte for byte
        key = str(uuid.uuid4())
        await c.put(
            f"{a.base}/api/v1/admin/skus/plain",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 10, "per_user_limit": 5},
        )
        taps = await asyncio.gather(
            *(post_order(c, s.base, key, user_id="tapper", sku_id="plain") for s in (a, b) * 5)
        )
        assert {r.status_code for r in taps} <= {202, 409}
        assert all(
            r.json()["error"] == "idempotency_key_in_use" for r in taps if r.status_code == 409
        )
        await asyncio.sleep(0.2)
        again = [await post_order(c, s.base, key, user_id="tapper", sku_id="plain") for s in (a, b)]
        assert {r.status_code for r in again} == {202}
        assert (
            len({r.content for r in again} | {r.content for r in taps if r.status_code == 202}) == 1
        )
        other = await post_order(c, b.base, key, user_id="tapper", sku_id="hot")
        assert (other.status_code, other.json()["error"]) == (422, "idempotency_key_reused")

        # payments through B, confirmed by whichever finalizer, read through A
        for i, oid in enumerate(held[:10]):
            body = json.dumps({"order_id": oid, "payment_id": f"pay-{i}"}).encode()
            r = await c.post(f"{b.base}/api/v1/payment/confirm", content=body, headers=signed(body))
            assert r.status_code == 202, r.text

        async def confirmed() -> bool:
            states = [
                (await c.get(f"{a.base}/api/v1/order/{oid}")).json()["status"] for oid in held[:10]
            ]
            return states == ["CONFIRMED"] * 10

        await wait_for(confirmed)
        view = (await c.get(f"{a.base}/api/v1/admin/skus/hot", headers=ADMIN)).json()
        assert (view["stock"], view["held"], view["sold"]) == (60, 50, 10)

        # one switch, applied by both instances within a second
        r = await c.post(f"{a.base}/api/v1/order/switch?mode=QUEUE_ONLY", headers=ADMIN)
        assert r.status_code == 200
        await asyncio.sleep(1.0)
        await c.put(
            f"{a.base}/api/v1/admin/skus/queued",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 5, "per_user_limit": 1, "buckets": 2},
        )
        queued = await asyncio.gather(
            *(
                post_order(
                    c, (a, b)[i % 2].base, str(uuid.uuid4()), user_id=f"q{i}", sku_id="queued"
                )
                for i in range(8)
            )
        )
        assert {(r.status_code, r.json()["status"]) for r in queued} == {(202, "QUEUED")}
        r = await c.post(f"{b.base}/api/v1/order/switch?mode=NORMAL", headers=ADMIN)
        assert r.status_code == 200

        async def decided() -> bool:
            states = Counter(
                [
                    (await c.get(f"{b.base}/api/v1/order/{r.json()['order_id']}")).json()["status"]
                    for r in queued
                ]
            )
            return states == {"HELD": 5, "REJECTED": 3}

        await wait_for(decided)


async def test_a_slot_moving_mid_sale_never_duplicates(tmp_path: Path) -> None:
    """The hot SKU's slot moves to another primary while orders arrive: every answer is a 202
    or a 503 with Retry-After (nothing held), retries with the same key are replays, and
    each key ends with exactly one order."""
    with LocalCluster(tmp_path / "moving", primaries=3) as cluster:
        url = cluster.url
        settings = Settings(redis_url=url, redis_cluster=True, redis_timeout_ms=5000)
        redis = create_client(settings)
        fast = create_script_client(settings)
        assert isinstance(fast, ClusterMux)
        try:
            scripts = ScriptRegistry()
            inv = Inventory(redis, scripts, settings, fast=fast)
            await inv.configure_sku(
                "mv", SkuConfig(promotion_id="p", stock=100_000, per_user_limit=1000)
            )
            slot = key_slot(b"mv")
            source = cluster.owner_port(slot)
            target = next(p for p in cluster.primary_ports if p != source)
            answers: dict[str, list[CreateResult]] = {}

            async def order(user: str) -> None:
                key = str(uuid.uuid4())
                answers[key] = []
                req = OrderRequest(user_id=user, sku_id="mv", quantity=1, promotion_id="p")
                for _ in range(100):
                    try:
                        result, _ = await inv.create_order(req, key)
                    except BackendUnavailable:  # a 503: nothing held, retry the same key
                        answers[key].append(CreateResult.IN_USE)  # recorded as not decided
                        await asyncio.sleep(0.02)
                        continue
                    answers[key].append(result)
                    if result in (CreateResult.CREATED, CreateResult.REPLAYED):
                        return
                    await asyncio.sleep(0.02)

            moved = asyncio.Event()

            async def shopper(user: str) -> None:
                # orders keep coming before, during and after the move, however long it takes
                # on a busy machine: each shopper orders twice more once the slot has moved
                after = 0
                for _ in range(200):
                    await order(user)
                    await asyncio.sleep(0.02)
                    after += moved.is_set()
                    if after >= 2:
                        return

            async def move() -> None:
                await asyncio.sleep(0.1)
                await asyncio.to_thread(cluster.migrate_slot, slot, target, finish=False)
                await asyncio.sleep(0.3)  # orders meet ASK and TRYAGAIN here
                await asyncio.to_thread(cluster.finish_migration, slot, target)
                moved.set()

            await asyncio.gather(move(), *(shopper(f"u{i}") for i in range(50)))
            assert cluster.owner_port(slot) == target
            failed = {
                k: a
                for k, a in answers.items()
                if not {CreateResult.CREATED, CreateResult.REPLAYED} & set(a)
            }
            assert not failed, list(failed.values())[:3]
            view = await inv.get_sku("mv")
            assert view is not None and view.held == len(answers) >= 100
            stream = await redis.xrange(keys.SkuKeys("mv").stream)
            assert len(stream) == len(answers)  # one order per key, none twice
            # the map followed the move: by a MOVED, or by the reload a TRYAGAIN asked for
            owner = fast._owner[slot] or ""
            assert fast.redirects["MOVED"] >= 1 or owner.endswith(f":{target}"), fast.redirects
            assert fast.redirects["ASK"] + fast.redirects["SLOT_MOVING"] >= 1, fast.redirects
            row = await inv.audit_sku("mv")
            assert row is not None and row.breaches() == []
        finally:
            await fast.aclose()
            await redis.aclose()


async def test_noscript_on_every_node_is_answered(cluster_url: str) -> None:
    """A node without the scripts (restarted, failed over, flushed) runs them from source once
    (EVAL) and caches them again: orders keep being accepted."""
    settings = Settings(redis_url=cluster_url, redis_cluster=True, redis_timeout_ms=10_000)
    client = create_client(settings)
    fast = create_script_client(settings)
    try:
        await client.flushall()
        inv = Inventory(client, ScriptRegistry(), settings, fast=fast)
        await inv.configure_sku("ns", SkuConfig(promotion_id="p", stock=5, per_user_limit=5))
        for node in client.get_primaries():  # type: ignore[union-attr]
            await client.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        assert not await ScriptRegistry().loaded(client)
        req = OrderRequest(user_id="u", sku_id="ns", quantity=1, promotion_id="p")
        assert (await inv.create_order(req, str(uuid.uuid4())))[0] is CreateResult.CREATED
        assert await inv.ping()  # reloads them everywhere
        assert await ScriptRegistry().loaded(client)
    finally:
        if fast is not None:
            await fast.aclose()
        await client.aclose()


async def test_a_cluster_out_of_reach_is_a_503_not_a_500(tmp_path: Path) -> None:
    """With every node gone, the cluster client raises its own errors (not redis-py's
    RedisError): they are outages like any other, every time, and a finalizer waits them
    out."""
    from gateway.workers.finalizer import Finalizer

    cluster = LocalCluster(tmp_path / "gone", primaries=3)
    url = cluster.start()
    settings = Settings(redis_url=url, redis_cluster=True, redis_timeout_ms=500)
    client = create_client(settings)
    try:
        inv = Inventory(client, ScriptRegistry(), settings)
        await inv.configure_sku("g", SkuConfig(promotion_id="p", stock=5, per_user_limit=5))
        cluster.stop()
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await inv.get_sku("g")
        assert not await inv.ping()
        stop = asyncio.Event()
        fin = Finalizer(client, ScriptRegistry(), settings)
        running = asyncio.create_task(fin.run(stop))
        await asyncio.sleep(1.5)
        assert not running.done()  # still waiting for the cluster, not crashed
        stop.set()
        await asyncio.wait_for(running, 5)
    finally:
        cluster.stop()
        await client.aclose()


async def test_a_primary_failover_loses_no_accepted_order(tmp_path: Path) -> None:
    """The hot SKU's primary is SIGKILLed mid-sale; one of its two replicas takes over. With
    FLASHGATE_WAITAOF_REPLICAS=1 a 202 means a replica has the order, so every order answered
    202 is there after the failover, none twice, and orders are accepted again once the new
    primary has a replica. Meanwhile the answers are 503s (nothing held)."""
    with LocalCluster(
        tmp_path / "fo", primaries=3, replicas=2, appendonly=True, appendfsync="always"
    ) as cluster:
        settings = Settings(
            redis_url=cluster.url, redis_cluster=True, redis_timeout_ms=1000, waitaof_replicas=1
        )
        sku = next(  # a SKU not on the seed node, which this test keeps alive
            s
            for s in (f"fo{i}" for i in range(100))
            if cluster.owner_port(key_slot(s.encode())) != cluster.primary_ports[0]
        )
        victim = cluster.owner_port(key_slot(sku.encode()))
        redis = create_client(settings)
        fast = create_script_client(settings)
        assert isinstance(fast, ClusterMux)
        try:
            inv = Inventory(redis, ScriptRegistry(), settings, fast=fast)
            cfg = SkuConfig(promotion_id="p", stock=100_000, per_user_limit=100)
            await inv.configure_sku(sku, cfg)
            accepted: dict[str, str] = {}  # key -> order id
            refused = 0
            crashed_at = after_crash = 0.0
            # a bound, not a pace: it ends at 50 accepted after the crash (a busy machine fails over
            # slower)
            deadline = time.monotonic() + 90

            async def shopper(n: int) -> None:
                nonlocal refused, after_crash
                i = 0
                while time.monotonic() < deadline and after_crash < 50:
                    key, i = str(uuid.uuid4()), i + 1
                    req = OrderRequest(
                        user_id=f"s{n}-{i}", sku_id=sku, quantity=1, promotion_id="p"
                    )
                    while time.monotonic() < deadline:
                        try:
                            result, body = await inv.create_order(req, key)
                        except BackendUnavailable:  # 503: the retry with the same key decides
                            refused += 1
                            await asyncio.sleep(0.05)
                            continue
                        if result in (CreateResult.CREATED, CreateResult.REPLAYED):
                            accepted[key] = json.loads(body)["order_id"]
                            after_crash += bool(crashed_at)
                            break
                        await asyncio.sleep(0.05)  # 409 in use: an earlier try's claim

            async def crash() -> None:
                nonlocal crashed_at
                await asyncio.sleep(1.0)
                await asyncio.to_thread(cluster.kill_node, victim)
                crashed_at = time.monotonic()

            await asyncio.gather(crash(), *(shopper(n) for n in range(10)))
            assert refused > 0  # the outage was seen
            assert after_crash >= 50  # and orders were accepted again after it
            assert cluster.owner_port(key_slot(sku.encode())) != victim
            # The general client never resends either: its first call after the failover may
            # fail (a 503) and reloads its map; the next is served.
            with contextlib.suppress(BackendUnavailable):
                await inv.get_sku(sku)
            for order_id in accepted.values():  # every 202 survived the failover
                assert await inv.get_order(order_id) is not None
            view = await inv.get_sku(sku)
            assert view is not None and view.held == len(accepted)
            stream = await redis.xrange(keys.SkuKeys(sku).stream)
            assert len(stream) == len(accepted)  # none twice
        finally:
            await fast.aclose()
            await redis.aclose()
