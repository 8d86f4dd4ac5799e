"""The short load test of CI: `python -m loadtests.run`, the real command over real sockets
(`flashgate serve` on its embedded server, Locust headless with a small spike), checked."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from gateway.ops.embedded import free_port
from gateway.store import keys
from loadtests.procs import Serve
from loadtests.summary import print_groups
from loadtests.verify import Findings, check_records, check_skus
from tests.support.api import ADMIN, ADMIN_TOKEN

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def processes_of(run_dir: Path) -> list[str]:
    """Live processes that belong to the run: its directory in their command line (serve,
    valkey-server, Locust) or environment (the gateway, finalizer, sweeper and workers)."""
    mark = str(run_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
            continue
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + " ".join(p.environ().values())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if mark in text:
            found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
    return found


@pytest.mark.timeout(150)
def test_short_spike_nothing_oversold_duplicated_or_lost(tmp_path: Path) -> None:
    out = tmp_path / "load"
    argv = [
        *(sys.executable, "-m", "loadtests.run", "--out", str(out)),
        *("--users", "30", "--spawn-seconds", "2", "--hold-seconds", "8"),
        *("--tail-seconds", "2", "--tail-users", "5", "--think-seconds", "0.3"),
        *("--stock", "10", "--switch-every", "2", "--queue-only-seconds", "1"),
        *("--scalpers", "1", "--user-qps", "5", "--user-burst", "10"),
        *("--client-qps", "5", "--client-burst", "10"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    log = f"stdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-3000:]}"

    assert processes_of(out) == [], log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] > 0 and summary["processes_left"] == 0, log
    counts = {k: summary.get(k) for k in ("oversold", "duplicate", "lost", "unsettled")}
    assert counts == {"oversold": 0, "duplicate": 0, "lost": 0, "unsettled": 0}, log
    assert summary["audit_exit_code"] == 0, log
    assert summary["locust_exit_code"] == 0, log
    assert summary["failures"] == 0 and summary["exceptions"] == 0, log
    assert run.returncode == 0, log
    assert "oversold: 0" in run.stdout and "duplicate: 0" in run.stdout
    assert "lost: 0" in run.stdout and "result: OK" in run.stdout

    assert (out / "report.html").stat().st_size > 0
    with open(out / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    with open(out / "locust_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    # What the run is for happened: orders held, queued and replayed, malformed ones refused,
    # the mode flipped; every accepted order was recorded and found again.
    answers = summary["by_answer"]
    for seen in ("202 HELD", "202 QUEUED", "202 replay", "400 invalid_request", "200 QUEUE_ONLY"):
        assert answers.get(seen, 0) > 0, (seen, answers)
    assert summary["orders"] > 0 and summary["recorded"] >= summary["orders"]
    # The scalpers were held to their budgets (one user, one address: at most a burst and the
    # refill over the run each) while the honest shoppers, each their own address behind
    # the trusted proxy, were hardly ever refused by them.
    honest, scalper = summary["groups"]["honest"], summary["groups"]["scalper"]
    assert scalper["client_rate_limited"] > 0, summary["groups"]
    run_s = 2 + 8 + 2 + 10  # the spike, the tail, and slack for a slow start and stop
    assert scalper["accepted"] <= (10 + 10) + (5 + 5) * run_s, summary["groups"]
    assert honest["creates"] > 0 and honest["p99_ms"] is not None
    assert honest["client_rate_limited"] <= honest["creates"] // 100, summary["groups"]


@pytest.mark.timeout(150)
def test_short_queue_shoppers_poll_as_told(tmp_path: Path) -> None:
    """`--scenario queue`: shoppers in a QUEUE_ONLY line behind a slow finalizer (2 % of the
    time), each reading its order only as Retry-After says; positions never rise (a Locust
    failure otherwise), nothing is lost, and the report has the poll volume and ETA error."""
    out = tmp_path / "line"
    argv = [
        *(sys.executable, "-m", "loadtests.run", "--out", str(out), "--scenario", "queue"),
        *("--users", "60", "--spawn-seconds", "1", "--hold-seconds", "6", "--tail-seconds", "1"),
        *("--tail-users", "5", "--stock", "100000", "--finalizer-share", "0.02"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    log = f"stdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-3000:]}"

    assert run.returncode == 0 and processes_of(out) == [], log
    summary = json.loads((out / "summary.json").read_text())
    counts = {k: summary.get(k) for k in ("oversold", "duplicate", "lost", "unsettled")}
    assert counts == {"oversold": 0, "duplicate": 0, "lost": 0, "unsettled": 0}, log
    assert summary["failures"] == 0 and summary["exceptions"] == 0, log
    assert summary["by_answer"].get("202 QUEUED", 0) > 0 and "202 HELD" not in summary["by_answer"]
    shoppers, finalizers = summary["line"]["shoppers"], summary["line"]["finalizers"]
    assert shoppers["orders"] > 0 and shoppers["reads"] >= shoppers["orders"], log
    assert finalizers["wait_s_count"] == summary["orders"], log  # every order was queued
    assert finalizers["eta_error_s_count"] > 0, log  # the rate was measured, ETAs were told
    assert "ETA error" in run.stdout and "reads" in run.stdout


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("mode", "stock"),
    [("QUEUE_ONLY", 10), ("NORMAL", 60)],
    ids=["queue_only-stock-short", "normal-stock-left"],
)
def test_short_fair_start_no_order_after_the_start_beats_the_prequeue(
    tmp_path: Path, mode: str, stock: int
) -> None:
    """`--scenario prequeue`: shoppers arrive for 5 s around a start 4 s in, behind a slow
    finalizer; those before the start are pre-queued and drawn. QUEUE_ONLY with less stock
    than the pre-queue (the draw's first ones hold it all, the rest and every later order are
    rejected), NORMAL with stock left for orders after the start (held only once the draw is
    done). No post-start order was decided before a pre-queued one, the HELD pre-queued orders
    are the first of the ranking, `flashgate verify-draw` passes, nothing lost."""
    out = tmp_path / "fair"
    argv = [
        *(sys.executable, "-m", "loadtests.run", "--out", str(out), "--scenario", "prequeue"),
        *("--mode", mode, "--start-in", "4", "--users", "30", "--spawn-seconds", "5"),
        *("--hold-seconds", "0.5", "--tail-seconds", "0.5", "--tail-users", "5"),
        *("--stock", str(stock), "--finalizer-share", "0.05", "--think-seconds", "0.5"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    log = f"stdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-3000:]}"

    assert run.returncode == 0 and processes_of(out) == [], log
    summary = json.loads((out / "summary.json").read_text())
    counts = {k: summary.get(k) for k in ("oversold", "duplicate", "lost", "unsettled")}
    assert counts == {"oversold": 0, "duplicate": 0, "lost": 0, "unsettled": 0}, log
    assert summary["failures"] == 0 and summary["exceptions"] == 0, log
    fair = summary["fairness"]
    assert fair["problems"] == [] and summary["verify_draw_exit_code"] == 0, log
    assert fair["prequeued"] > 0 and fair["after_start"] > 0, log  # both sides of the start
    assert fair["prequeued_held"] == min(stock, fair["prequeued"]), log
    assert fair["first_after_start_decided_ms"] >= fair["last_prequeued_decided_ms"], log
    if stock < fair["prequeued"]:
        assert fair["after_start_held"] == 0, log
    else:
        assert fair["after_start_held"] == min(stock - fair["prequeued"], fair["after_start"])
    # /metrics of the run's gateway: the draw done, its gauges and the finalizer's counts
    drawn = summary["draw_metrics"]
    assert (drawn["state"], drawn["prequeued"], drawn["drawn"]) == (
        "done", fair["prequeued"], fair["prequeued"]), log  # fmt: skip
    assert (drawn["held"], drawn["rejected"], drawn["timed"]) == (
        fair["prequeued_held"], fair["prequeued"] - fair["prequeued_held"], 1), log  # fmt: skip
    line = summary["line"]
    assert line["prequeued"]["orders"] == fair["prequeued"], log  # each shopper saw its end
    assert line["prequeued"]["reads"] >= fair["prequeued"], log
    assert "fair start:" in run.stdout and "verify-draw: exit code 0" in run.stdout


def test_the_checks_count_what_they_are_for(tmp_path: Path) -> None:
    """The runner's checks against a real server: a clean record passes, and each planted
    fault is counted once: a key with two orders, a user over the limit, an order and a
    payment nobody has, a paid order still HELD, a SKU with more sold than stock."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(FLASHGATE_ADMIN_TOKEN=ADMIN_TOKEN, FLASHGATE_PAYMENT_SECRET="s")
    serve = Serve(tmp_path, port=free_port(), workers=1, env=env, options=[])
    try:
        serve.start(lambda: None)
        r = httpx.put(
            f"{serve.base}/api/v1/admin/skus/k",
            headers=ADMIN,
            json={"promotion_id": "p", "stock": 5, "per_user_limit": 1},
        )
        assert r.status_code == 201

        def order(user: str, key: str) -> dict[str, object]:
            body = {"user_id": user, "sku_id": "k", "quantity": 1, "promotion_id": "p"}
            r = httpx.post(
                f"{serve.base}/api/v1/order/create", json=body, headers={"X-Idempotency-Key": key}
            )
            assert r.status_code == 202, r.text
            return {"order_id": r.json()["order_id"], "user_id": user, "key": key, "sku_id": "k"}

        first, second = order("u1", str(uuid.uuid4())), order("u2", str(uuid.uuid4()))
        client = redis.Redis.from_url(serve.redis_url(), decode_responses=True)
        try:
            clean = Findings()
            check_skus(client, ["k"], clean)
            check_records(client, serve.base, [first, {**first, "replayed": True}], [], clean)
            assert clean.counts() == {"oversold": 0, "duplicate": 0, "lost": 0, "unsettled": 0}
            assert (clean.recorded, clean.orders, clean.replays) == (2, 1, 1)

            never = {**second, "order_id": "a" * 26 + ".k"}  # u2's key, an order nobody has
            client.hset(keys.SkuKeys("k").order("b" * 26 + ".k"), mapping=FAKE_HOLD)  # u1 again
            client.hincrby(keys.SkuKeys("k").sku, "sold", 10)  # more sold than stock
            payment = {"order_id": second["order_id"], "payment_id": "pay-never-made"}
            found = Findings()
            check_skus(client, ["k"], found)
            check_records(client, serve.base, [first, second, never], [payment], found)
        finally:
            client.close()
        assert list(found.oversold) == ["k"]
        assert sorted(found.duplicate) == ["k/u1", f"u2/{second['key']}"]
        assert sorted(found.lost) == sorted([never["order_id"], "payment pay-never-made"])
        assert list(found.unsettled) == [second["order_id"]]
    finally:
        stopped = serve.stop()
    assert stopped == 0
    assert processes_of(tmp_path) == []


FAKE_HOLD = {
    "status": "HELD",
    "user_id": "u1",
    "sku_id": "k",
    "quantity": "1",
    "promotion_id": "p",
    "created_at": "1",
    "history": '[{"from": null, "to": "HELD", "at": 1}]',
}


def test_the_report_names_only_the_groups_that_ordered(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = {"creates": 0, "accepted": 0, "client_rate_limited": 0, "p50_ms": None, "p99_ms": None}
    busy = {**quiet, "creates": 9, "accepted": 7, "client_rate_limited": 2, "p50_ms": 3,
            "p99_ms": 40}  # fmt: skip
    print_groups({"honest": busy, "scalper": quiet})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "honest creates: 9, accepted 7, 429 client_rate_limited 2; p50 3 ms, p99 40 ms"
    ]
