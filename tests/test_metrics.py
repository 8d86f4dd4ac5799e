"""GET /metrics: Prometheus text of what the gateway did and what Redis holds, in process and
over a real `serve --workers 2`, where every scrape must add up every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tests.support.api import ADMIN, Client, MakeClient, create, put_sku
from tests.support.processes import Serve, descendants, stampede
from tests.support.state import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )


async def scrape(c: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    return parse(r.text)


async def test_answers_latency_and_redis_figures(make_client: MakeClient, redis: Redis) -> None:
    client = await make_client(figures_max_age_ms=0)  # both scrapes read Redis
    await put_sku(client, stock=3, per_user_limit=1)
    before = await scrape(client)
    key = "0b5a3f6e-8d7c-4e1f-9a2b-3c4d5e6f7a8b"
    assert (await create(client, key, user_id="a")).status_code == 202
    assert (await create(client, key, user_id="a")).status_code == 202  # replay
    for user in ("b", "c", "d"):
        await create(client, user_id=user)  # two accepted, then sold out
    await client.post("/api/v1/order/create", content=b"{", headers={"X-Idempotency-Key": key})
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = {"route": "/api/v1/order/create"}
    assert delta("flashgate_requests_total", **route, status="202", code="created") == 3
    assert delta("flashgate_requests_total", **route, status="202", code="replayed") == 1
    assert delta("flashgate_requests_total", **route, status="409", code="sold_out") == 1
    assert delta("flashgate_requests_total", **route, status="400", code="invalid_request") == 1
    assert delta("flashgate_request_duration_seconds_count", **route) == 6
    assert delta("flashgate_redis_script_duration_seconds_count", script="create_order") == 5
    sku = {"sku": "sku-42"}
    assert total(after, "flashgate_sku_stock", **sku) == 3
    assert total(after, "flashgate_sku_available", **sku) == 0
    assert total(after, "flashgate_sku_held", **sku) == 3
    assert total(after, "flashgate_sku_holds", **sku) == 3
    assert total(after, "flashgate_sku_backlog", **sku) == 3
    assert total(after, "flashgate_redis_up") == 1
    assert total(after, "flashgate_intake_mode", mode="NORMAL") == 1
    assert total(after, "flashgate_breaker_state") == 0
    assert not any("user" in dict(labels) for _, labels in after)  # SKU labels, never users


async def test_bucket_refusals_breaker_and_mode_are_counted(
    make_client: MakeClient, redis: Redis
) -> None:
    c = await make_client(qps=0.001, burst=1, figures_max_age_ms=0)
    await put_sku(c, stock=10)
    before = await scrape(c)
    assert (await create(c)).status_code == 202
    assert (await create(c, user_id="u2")).status_code == 429
    switch = await c.post("/api/v1/order/switch?mode=QUEUE_ONLY", headers=ADMIN)
    assert switch.status_code == 200
    after = await scrape(c)
    refusals = "flashgate_token_bucket_refusals_total"
    assert total(after, refusals) - total(before, refusals) == 1
    assert total(after, "flashgate_intake_mode", mode="QUEUE_ONLY") == 1
    assert total(after, "flashgate_worker_mode_queue_only") == 1


async def test_client_refusals_and_the_rules_version_are_counted(make_client: MakeClient) -> None:
    c = await make_client(user_qps=0.001, user_burst=1)
    await put_sku(c, stock=10)
    before = await scrape(c)
    assert (await create(c)).status_code == 202
    assert (await create(c)).status_code == 429
    r = await c.put("/api/v1/admin/rules", json={"burst": 7}, headers=ADMIN)
    assert r.status_code == 200
    after = await scrape(c)
    refusals = "flashgate_client_refusals_total"
    assert total(after, refusals, limit="user") - total(before, refusals, limit="user") == 1
    assert total(after, refusals, limit="client") == total(before, refusals, limit="client")
    assert total(after, "flashgate_rules_version") == 1


def test_every_worker_counts_in_every_scrape(data_dir: Path) -> None:
    """Two workers share the load; any scrape, whichever worker answers it, counts every
    request; a worker killed keeps its counts in the sum and leaves the live gauges."""
    serve = Serve(data_dir, "--workers", "2")
    try:
        serve.put_hot(50)
        assert asyncio.run(stampede(serve.base, 200, "hot")) == {202: 50, 409: 150}

        def orders(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
            return total(samples, "flashgate_requests_total", route="/api/v1/order/create")

        time.sleep(1.5)  # each worker writes its counts once a second
        seen_pids = set()
        for _ in range(12):  # new connections: both workers answer some of them
            r = httpx.get(f"{serve.base}/metrics", headers={"Connection": "close"})
            samples = parse(r.text)
            assert orders(samples) == 200
            assert (
                total(samples, "flashgate_sku_sold", sku="hot")
                + total(samples, "flashgate_sku_held", sku="hot")
                == 50
            )
            seen_pids |= {dict(ls)["pid"] for n, ls in samples if n == "flashgate_breaker_state"}
        assert len(seen_pids) == 2  # one breaker gauge per live worker
        workers = [p for p in descendants(serve.proc.pid) if _is_gateway_worker(p)]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # uvicorn replaces the worker
            try:
                samples = parse(httpx.get(f"{serve.base}/metrics", timeout=2).text)
            except httpx.HTTPError:
                continue
            pids = {dict(ls)["pid"] for n, ls in samples if n == "flashgate_breaker_state"}
            if str(workers[0]) not in pids:
                break
            time.sleep(0.2)
        assert str(workers[0]) not in pids  # the dead worker's gauge is gone
        assert orders(samples) >= 200  # its counts are not
    finally:
        serve.stop()


def _is_gateway_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"spawn_main" in part for part in cmd) and not any(
        b"resource_tracker" in part for part in cmd
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_batched_observations_equal_prometheus_own() -> None:
    """What `observe` + `flush` write is what prometheus-client's `observe` would have."""
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.telemetry import metrics

    registry = CollectorRegistry()
    ours = Histogram("ours_seconds", "x", ["l"], buckets=metrics.SLO_BUCKETS, registry=registry)
    theirs = Histogram("theirs_seconds", "x", ["l"], buckets=metrics.SLO_BUCKETS, registry=registry)
    values = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.8, 0.81, 4.99, 5.0, 7.5, 120.0] * 3
    for v in values:
        metrics.observe(ours, "a", v)
        theirs.labels("a").observe(v)
    metrics.flush()
    mine = {(s.name.replace("ours", "x"), tuple(sorted(s.labels.items())), s.value)
            for f in registry.collect() if f.name == "ours_seconds" for s in f.samples
            if not s.name.endswith("_created")}  # fmt: skip
    reference = {(s.name.replace("theirs", "x"), tuple(sorted(s.labels.items())), s.value)
                 for f in registry.collect() if f.name == "theirs_seconds" for s in f.samples
                 if not s.name.endswith("_created")}  # fmt: skip
    assert mine == reference
    assert len(mine) == len(metrics.SLO_BUCKETS) + 3  # buckets, +Inf, count, sum


DASHBOARD = Path(__file__).resolve().parent.parent / "ops" / "grafana" / "flashgate.json"


async def test_the_dashboard_queries_only_metrics_and_labels_that_exist(client: Client) -> None:
    """Every metric a panel of ops/grafana/flashgate.json queries is in /metrics, with the
    labels the query selects or groups by."""
    import json
    import re

    await put_sku(client, stock=1, per_user_limit=1)
    await create(client)
    await create(client, user_id="late")  # sold out
    text = (await client.get("/metrics")).text
    families = list(text_string_to_metric_families(text))
    known = {f.name for f in families} | {s.name for f in families for s in f.samples}
    labels: dict[str, set[str]] = {}
    for f in families:
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            labels.setdefault(f.name, set()).update(s.labels)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    for expr in exprs:
        for name, selector in re.findall(r"(flashgate_[a-z_]+)(\{[^}]*\})?", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in known or base in known, (name, expr)
            used = set(re.findall(r"(\w+)=", selector))
            have = labels.get(name, set()) | labels.get(base, set())
            if have:  # a family with samples: its labels are known
                assert used - {"le"} <= have, (name, used, have)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            names = re.findall(r"flashgate_[a-z_]+", expr)
            have = set().union(*(labels.get(n, set()) for n in names))
            if have:  # no sample yet (no breaker transition in this test): name checked above
                assert {g.strip() for g in group.split(",")} <= have | {"le"}, (expr, have)


def test_the_dashboard_shows_the_relay_lag() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for name in ("flashgate_relay_lag", "flashgate_relay_oldest_unconfirmed_seconds"):
        assert name in exprs


def test_the_dashboard_shows_the_draw() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for name in ("flashgate_sku_draw_prequeued", "flashgate_sku_draw_drawn",
                 "flashgate_sku_draw_state", "flashgate_draw_orders_total",
                 "flashgate_draw_duration_seconds"):  # fmt: skip
        assert name in exprs
