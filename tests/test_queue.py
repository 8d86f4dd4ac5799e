"""Shoppers in line: a QUEUED order's position, ETA and poll interval, against the real server
(and the 3-primary cluster), with real finalizers draining the queue while shoppers poll."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.schemas import OrderRequest, QueueView, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, keys, queue
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult, Finalized
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer
from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.processes import Serve
from tests.support.state import BOTH_BACKENDS

SWITCH = "/api/v1/order/switch"
CREATE = "/api/v1/order/create"


class Line:
    """A SKU's queue driven through the store and real finalizers."""

    def __init__(self, redis: Redis, scripts: ScriptRegistry, settings: Settings) -> None:
        self.redis = redis
        self.scripts = scripts
        self.settings = settings
        self.inv = Inventory(redis, scripts, settings)

    def finalizer(self, name: str) -> Finalizer:
        fin = Finalizer(self.redis, self.scripts, self.settings, name=name)
        fin.claim_every_s = 0.0
        return fin

    async def sku(self, sku: str = "s", stock: int = 1000) -> None:
        cfg = SkuConfig(promotion_id="p", stock=stock, per_user_limit=1000)
        await self.inv.configure_sku(sku, cfg)

    async def queue(self, n: int, sku: str = "s") -> list[dict[str, Any]]:
        bodies = []
        for i in range(n):
            req = OrderRequest(user_id=f"u{i}", sku_id=sku, quantity=1, promotion_id="p")
            result, body = await self.inv.create_order(req, str(uuid.uuid4()), queue_only=True)
            assert result is CreateResult.CREATED
            bodies.append(json.loads(body))
        return bodies

    async def place(self, order_id: str) -> QueueView | None:
        view = await self.inv.get_order(order_id)
        assert view is not None
        assert (view.queue is not None) == (view.status == "QUEUED"), view
        return view.queue

    async def counters(self, sku: str = "s") -> dict[str, int]:
        raw = await self.redis.hmget(keys.SkuKeys(sku).sku, "queue_in", "queue_out", "backlog")
        return dict(zip(("in", "out", "backlog"), (int(v or 0) for v in raw), strict=True))


@pytest.fixture
async def line(redis: Redis, settings: Settings) -> Line:
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    return Line(redis, scripts, settings.replace(finalizer_claim_idle_ms=0, finalizer_batch=7))


async def poll_while_draining(
    line: Line, finalizers: list[Finalizer], order_ids: list[str]
) -> dict[str, list[int]]:
    """Run the finalizers until the queue is empty while a poller reads every order's place
    over and over; returns each order's positions in the order they were read."""
    seen: dict[str, list[int]] = {oid: [] for oid in order_ids}
    done = asyncio.Event()

    async def drain(fin: Finalizer) -> None:
        while (await line.counters())["backlog"] > 0:
            if not await fin.step(block=False):
                await asyncio.sleep(0.001)
        done.set()

    async def poll() -> None:
        while not done.is_set():
            for oid in order_ids:
                place = await line.place(oid)
                if place is not None:
                    seen[oid].append(place.position)
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(poll(), *(drain(f) for f in finalizers)), 60)
    return seen


def non_increasing(positions: list[int]) -> bool:
    return all(a >= b for a, b in zip(positions, positions[1:], strict=False))


@BOTH_BACKENDS
async def test_sequential_queued_orders_are_numbered_1_to_n(client: Client, redis: Redis) -> None:
    await put_sku(client, stock=100, per_user_limit=100)
    assert (await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)).is_success
    answers = [await create(client, user_id=f"u{i}") for i in range(25)]
    assert [a.status_code for a in answers] == [202] * 25
    assert [a.json()["position"] for a in answers] == list(range(1, 26))
    for i, a in enumerate(answers, 1):
        r = await client.get(f"/api/v1/order/{a.json()['order_id']}")
        assert r.status_code == 200
        place = r.json()["queue"]
        # nothing drained yet: no rate, so no ETA, and a poll interval from the position
        assert place == {"position": i, "eta_s": None, "poll_after_s": 1}
        assert r.headers["retry-after"] == str(place["poll_after_s"])
    counters = await redis.hmget(keys.SkuKeys("sku-42").sku, "queue_in", "backlog")
    assert counters == [b"25", b"25"]


@BOTH_BACKENDS
async def test_a_replayed_queued_answer_repeats_its_position(client: Client) -> None:
    await put_sku(client, stock=10)
    await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
    await create(client, user_id="first")
    key = str(uuid.uuid4())
    r = await create(client, key, user_id="u2")
    assert r.json()["position"] == 2
    await create(client, user_id="third")
    again = await create(client, key, user_id="u2")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == r.content  # byte for byte, position 2 as first answered


async def test_orders_that_are_not_queued_carry_no_place(client: Client) -> None:
    await put_sku(client, stock=10)
    held = (await create(client)).json()
    assert held["status"] == "HELD" and "position" not in held
    r = await client.get(f"/api/v1/order/{held['order_id']}")
    assert "queue" not in r.json() and "retry-after" not in r.headers


@BOTH_BACKENDS
async def test_a_bucketed_sku_has_one_line_per_bucket(line: Line) -> None:
    cfg = SkuConfig(promotion_id="p", stock=100, per_user_limit=100, buckets=3)
    await line.inv.configure_sku("s", cfg)
    bodies = await line.queue(30)
    by_bucket: dict[str, list[int]] = {}
    for b in bodies:
        by_bucket.setdefault(b["order_id"].partition(".")[2], []).append(b["position"])
    assert len(by_bucket) == 3  # 30 shoppers spread over the three buckets
    for positions in by_bucket.values():
        assert positions == list(range(1, len(positions) + 1))
    for b in bodies:
        place = await line.place(b["order_id"])
        assert place is not None and place.position == b["position"]


async def test_a_backlog_from_before_the_numbering_counts_ahead(line: Line) -> None:
    """A SKU whose stream already held orders when the queue counters started: the first
    numbered order counts them ahead of it."""
    await line.sku()
    await line.redis.hset(keys.SkuKeys("s").sku, "backlog", 5)
    (first,) = await line.queue(1)
    assert first["position"] == 6
    assert await line.counters() == {"in": 6, "out": 0, "backlog": 6}
    await line.redis.hset(keys.SkuKeys("s").sku, "backlog", 1)  # as if the 5 were drained
    await line.redis.hset(keys.SkuKeys("s").sku, "queue_out", 5)
    place = await line.place(first["order_id"])
    assert place is not None and place.position == 1


@BOTH_BACKENDS
async def test_positions_never_increase_while_a_finalizer_drains(line: Line) -> None:
    await line.sku(stock=150)  # some are rejected: REJECTED orders leave the queue too
    bodies = await line.queue(200)
    ids = [b["order_id"] for b in bodies]
    assert [b["position"] for b in bodies] == list(range(1, 201))
    watched = ids[::20] + ids[-3:]
    seen = await poll_while_draining(line, [line.finalizer("f1")], watched)
    for oid in watched:
        assert seen[oid] and non_increasing(seen[oid]), seen[oid]
    assert len(set(seen[ids[-1]])) > 3  # the last one saw its place fall while it waited
    for oid in ids:  # decided: no place any more
        assert await line.place(oid) is None
    assert await line.counters() == {"in": 200, "out": 200, "backlog": 0}


async def test_two_finalizers_drain_one_queue_with_positions_that_never_increase(
    line: Line,
) -> None:
    await line.sku(stock=1000)
    ids = [b["order_id"] for b in await line.queue(240)]
    watched = ids[::15] + ids[-2:]
    fins = [line.finalizer("f1"), line.finalizer("f2")]
    seen = await poll_while_draining(line, fins, watched)
    for oid in watched:
        assert non_increasing(seen[oid]), seen[oid]
        assert all(1 <= p <= 240 for p in seen[oid])
    assert fins[0].applied > 0 and fins[1].applied > 0  # both took part
    # with claim_idle_ms 0 each also reclaims what the other holds: entries applied twice
    # (the second a duplicate) still count out of the queue once
    assert fins[0].applied + fins[1].applied >= 240
    assert await line.counters() == {"in": 240, "out": 240, "backlog": 0}


async def test_an_entry_reclaimed_from_a_dead_finalizer(line: Line, redis: Redis) -> None:
    """A finalizer that read the first entries and died holds them pending: the orders behind
    them move up as the others drain; the stuck ones stay at position 1 (next), never above
    where they were, until another finalizer reclaims and decides them."""
    await line.sku()
    ids = [b["order_id"] for b in await line.queue(10)]
    fin = line.finalizer("alive")
    await fin.refresh_streams()
    stream = keys.SkuKeys("s").stream
    taken = await redis.xreadgroup(keys.FINALIZER_GROUP, "dead", {stream: ">"}, count=2)
    assert len(taken[0][1]) == 2  # the first two orders, delivered and never acknowledged
    before = [await line.place(oid) for oid in ids]
    assert [p.position for p in before if p] == list(range(1, 11))
    fin.claim_idle_ms = 60_000  # not idle long enough to be reclaimed yet
    while await fin.step(block=False):  # the other eight, decided in order
        pass
    after = [await line.place(oid) for oid in ids]
    assert after[2:] == [None] * 8
    stuck = [p.position for p in after[:2] if p]
    assert stuck == [1, 1]  # undercounted, never above what they were: 8 behind them left
    assert await line.counters() == {"in": 10, "out": 8, "backlog": 2}
    fin.claim_idle_ms = 0
    assert await fin.step(block=False) == 2  # reclaimed (XAUTOCLAIM) and decided
    assert [await line.place(oid) for oid in ids[:2]] == [None, None]
    assert await line.counters() == {"in": 10, "out": 10, "backlog": 0}


@pytest.mark.corrupts
async def test_a_dead_lettered_order_leaves_the_queue(line: Line, redis: Redis) -> None:
    await line.sku()
    ids = [b["order_id"] for b in await line.queue(3)]
    await redis.hdel(keys.order_key(ids[0]) or "", "quantity")  # corrupt: cannot be decided
    fin = line.finalizer("f1")
    fin.max_deliveries = 1
    await fin.refresh_streams()
    seen = {oid: (await line.place(oid)) for oid in ids[1:]}
    assert [p.position for p in seen.values() if p] == [2, 3]
    await fin.step(block=False)
    assert await redis.xlen(keys.SkuKeys("s").dead) == 1
    assert await line.counters() == {"in": 3, "out": 3, "backlog": 0}


async def drain_at(line: Line, times_ms: list[int], sku: str = "s") -> None:
    """Decide the queue's first len(times_ms) orders at the given server times (finalize.lua
    with now_ms), as a finalizer would: the drain rate is measured over those times."""
    sk = keys.SkuKeys(sku)
    fin = line.finalizer("timed")
    await fin.refresh_streams()
    reply = await line.redis.xreadgroup(
        keys.FINALIZER_GROUP, "timed", {sk.stream: ">"}, count=len(times_ms)
    )
    entries = reply[0][1]
    assert len(entries) == len(times_ms)
    for (entry_id, fields), at in zip(entries, times_ms, strict=True):
        call = calls.finalize(
            sk, sk.stream, group=keys.FINALIZER_GROUP, entry_id=entry_id, event="created",
            order_id=fields[b"order_id"].decode(), payment_id="", hold_ttl_ms=900_000, now_ms=at,
        )  # fmt: skip
        Finalized.of(await line.scripts["finalize"](line.redis, *call))


@BOTH_BACKENDS
async def test_the_eta_comes_from_the_measured_drain_rate(line: Line, client: Client) -> None:
    await line.sku(stock=1000)
    ids = [b["order_id"] for b in await line.queue(400)]
    now = int(time.time() * 1000)
    # 200 orders decided at 100 a second, ending now: the first windows of 1 s measure 100/s
    await drain_at(line, [now - 2000 + i * 10 for i in range(200)])
    rate = float(await line.redis.hget(keys.SkuKeys("s").sku, "drain_rate") or 0)
    assert rate == pytest.approx(100, rel=0.02)
    place = await line.place(ids[399])
    assert place is not None and place.position == 200
    assert place.eta_s == pytest.approx(200 / rate, abs=0.1)
    assert place.poll_after_s == math.ceil(place.eta_s / 4)
    r = await client.get(f"/api/v1/order/{ids[210]}")
    body = r.json()["queue"]
    assert body["position"] == 11 and body["eta_s"] == pytest.approx(0.1, abs=0.05)
    assert r.headers["retry-after"] == "1" == str(body["poll_after_s"])
    # an order queued now is told an ETA: when it is decided, the error is measured
    (late,) = await line.queue(1)
    assert late["position"] == 201
    eta_ms = int(await line.redis.hget(keys.SkuKeys("s").order(late["order_id"]), "queue_eta_ms"))
    assert eta_ms == pytest.approx(201 / rate * 1000, abs=2)


async def test_the_finalizer_measures_the_wait_and_the_eta_error(line: Line) -> None:
    def counts() -> tuple[float, float]:
        wait = REGISTRY.get_sample_value("flashgate_queue_wait_seconds_count") or 0
        error = REGISTRY.get_sample_value("flashgate_queue_eta_error_seconds_count") or 0
        return wait, error

    await line.sku()
    await line.queue(3)  # no rate yet: queued without an ETA
    await line.redis.hset(keys.SkuKeys("s").sku, "drain_rate", "50")
    await line.queue(2)  # told an ETA
    before = counts()
    fin = line.finalizer("f1")
    while await fin.step(block=False):
        pass
    wait, error = counts()
    assert (wait - before[0], error - before[1]) == (5, 2)


async def test_a_queue_that_stopped_moving_has_no_eta(line: Line) -> None:
    await line.sku()
    ids = [b["order_id"] for b in await line.queue(300)]
    long_ago = int(time.time() * 1000) - 120_000
    await drain_at(line, [long_ago + i * 10 for i in range(200)])  # then nothing for 2 min
    place = await line.place(ids[-1])
    assert place is not None and place.position == 100
    assert place.eta_s is None and place.poll_after_s == 2  # 100 places, a second per 50


def test_poll_after_grows_with_the_wait_within_1_and_30_seconds() -> None:
    assert queue.poll_after_s(1, 0.01) == 1
    assert queue.poll_after_s(500, 10.0) == 3
    assert queue.poll_after_s(50_000, 500.0) == 30
    assert queue.poll_after_s(1, None) == 1
    assert queue.poll_after_s(1000, None) == 20
    assert queue.poll_after_s(10**6, None) == 30
    waits = [queue.poll_after_s(p, p / 100) for p in range(1, 20_000, 97)]
    assert waits == sorted(waits) and waits[0] == 1 and waits[-1] == 30


def test_a_slow_queue_keeps_its_eta_longer() -> None:
    now = 1_000_000
    assert queue.eta_s(10, 100.0, now - 29_000, now) == 0.1
    assert queue.eta_s(10, 100.0, now - 31_000, now) is None
    assert queue.eta_s(10, 0.1, now - 31_000, now) == 100.0  # 5 drains take 50 s at 0.1/s
    assert queue.eta_s(10, 0.0, now, now) is None


def test_serve_shoppers_poll_as_told_until_decided(tmp_path: Path) -> None:
    """`flashgate serve` (gateway, finalizer, embedded server): shoppers queue in QUEUE_ONLY
    and poll as `Retry-After` tells them until decided, one of them with the example client of
    docs/api/shoppers.md; their positions never rise, and the finalizer's wait histogram and
    the drain rate reach `GET /metrics`."""
    serve = Serve(tmp_path / "data")
    try:
        serve.put_hot(150)
        switched = httpx.post(f"{serve.base}{SWITCH}", params={"mode": "QUEUE_ONLY"}, headers=ADMIN)
        assert switched.status_code == 200
        time.sleep(1.2)  # every worker applies the switch within a second
        trails, doc_order, doc_places = asyncio.run(line_up(serve.base, 200))
        metrics = httpx.get(f"{serve.base}/metrics").text
    finally:
        assert serve.stop() == 0
    statuses = [t[-1] for t in trails] + [doc_order["status"]]
    assert statuses.count("HELD") == 150 and statuses.count("REJECTED") == 51
    for trail in trails:
        positions = [p for p in trail if isinstance(p, int)]
        assert positions and non_increasing(positions), trail
    assert all(1 <= int(t[0]) <= 201 for t in trails)  # the finalizer drained meanwhile
    assert non_increasing([p["position"] for p in doc_places])
    samples = {(s.name, tuple(s.labels.items())): s.value for s in parsed(metrics)}
    assert samples["flashgate_queue_wait_seconds_count", ()] == 201
    assert ("flashgate_sku_drain_rate", (("sku", "hot"),)) in samples


def doc_client() -> Any:
    """`buy`, the example client of docs/api/shoppers.md (its first Python block)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "api" / "shoppers.md").read_text()
    source = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/api/shoppers.md", "exec"), namespace)
    return namespace["buy"]


async def line_up(
    base: str, n: int
) -> tuple[list[list[int | str]], dict[str, Any], list[dict[str, Any]]]:
    """n shoppers, and the docs' example client among them (in a thread: it blocks)."""
    places: list[dict[str, Any]] = []
    buy = doc_client()
    doc = asyncio.to_thread(buy, base, "doc-shopper", "hot", "promo-1", places.append)
    trails, order = await asyncio.gather(shoppers(base, n), doc)
    return trails, order, places


def parsed(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def shoppers(base: str, n: int) -> list[list[int | str]]:
    """n shoppers, each: one order, then its GET whenever Retry-After says, until decided.
    Each trail: the 202's position, every polled position, the final status."""

    async def shopper(c: httpx.AsyncClient, i: int) -> list[int | str]:
        body = {"user_id": f"u{i}", "sku_id": "hot", "quantity": 1, "promotion_id": "promo-1"}
        r = await c.post(CREATE, json=body, headers={"X-Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 202, r.text
        trail: list[int | str] = [r.json()["position"]]
        while True:
            got = await c.get(f"/api/v1/order/{r.json()['order_id']}")
            view = got.json()
            if view["status"] != "QUEUED":
                assert "queue" not in view and "retry-after" not in got.headers
                return [*trail, view["status"]]
            assert got.headers["retry-after"] == str(view["queue"]["poll_after_s"])
            trail.append(view["queue"]["position"])
            await asyncio.sleep(int(got.headers["retry-after"]))

    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        return await asyncio.wait_for(asyncio.gather(*(shopper(c, i) for i in range(n))), 60)
