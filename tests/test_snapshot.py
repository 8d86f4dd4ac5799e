"""`telemetry.snapshot`: the console's reading of what every worker of an instance counted,
from metrics files written in prometheus-client's own multiprocess format (`MmapedDict`, the
writer the workers use): counters and histograms of every worker summed, the gauges of live
workers only, other routes and families left out, one reading shared for `SHARED_S`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from gateway.telemetry import metrics, snapshot

ROUTE = "/api/v1/order/create"
LATENCY = "flashgate_request_duration_seconds"


def _write(path: Path, values: list[tuple[str, str, dict[str, str], float]]) -> None:
    store = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    for family, sample, labels, value in values:
        key = mmap_key(family, sample, list(labels), list(labels.values()), "help")
        store.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    store.close()  # type: ignore[no-untyped-call]


def _worker(directory: Path, pid: int, *, created: int, fast: int, slow: int) -> None:
    """One worker's files: its answers, its latency buckets (per bucket, as written), its
    breaker (open for odd pids) and mode, and another route's answers."""
    answers = [
        ("flashgate_requests", "flashgate_requests_total",
         {"code": "created", "route": ROUTE, "status": "202"}, float(created)),
        ("flashgate_requests", "flashgate_requests_total",
         {"code": "sold_out", "route": ROUTE, "status": "409"}, 2.0),
        ("flashgate_requests", "flashgate_requests_total",
         {"code": "ok", "route": "/readyz", "status": "200"}, 50.0),
        (LATENCY, f"{LATENCY}_bucket", {"le": "0.001", "route": ROUTE}, float(fast)),
        (LATENCY, f"{LATENCY}_bucket", {"le": "0.1", "route": ROUTE}, float(slow)),
        (LATENCY, f"{LATENCY}_bucket", {"le": "0.001", "route": "/readyz"}, 50.0),
        (LATENCY, f"{LATENCY}_sum", {"route": ROUTE}, 0.5),
    ]  # fmt: skip
    _write(directory / f"counter_{pid}.db", answers[:3])
    _write(directory / f"histogram_{pid}.db", answers[3:])
    _write(
        directory / f"gauge_liveall_{pid}.db",
        [("flashgate_breaker_state", "flashgate_breaker_state", {}, float(pid % 2)),
         ("flashgate_worker_mode_queue_only", "flashgate_worker_mode_queue_only", {}, 1.0)],
    )  # fmt: skip


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    snapshot._kept.clear()
    yield tmp_path
    snapshot._kept.clear()


def _gone_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_every_worker_is_added_up_and_only_live_ones_listed(directory: Path) -> None:
    me, gone = os.getpid(), _gone_pid()
    _worker(directory, me, created=3, fast=2, slow=1)
    _worker(directory, gone, created=4, fast=1, slow=3)
    shot = snapshot.take(ROUTE, clock=lambda: 100.0)
    assert shot.answers == {"created": 7, "sold_out": 4}  # a worker gone still counts
    bounds = [b * 1000 for b in metrics.SLO_BUCKETS]
    assert shot.le_ms == pytest.approx(bounds)
    fast_at, slow_at = bounds.index(1.0), bounds.index(100.0)
    assert shot.buckets[fast_at] == 3 and shot.buckets[slow_at] == 7  # cumulative
    assert shot.buckets[-1] == 7 and shot.buckets == sorted(shot.buckets)
    assert shot.sum_s == pytest.approx(1.0)
    # only the live worker; its breaker as the gauge says, its mode
    breaker = "open" if me % 2 else "closed"
    assert shot.workers == [snapshot.WorkerState(me, breaker, "QUEUE_ONLY")]


def test_one_reading_serves_for_half_a_second(directory: Path) -> None:
    me = os.getpid()
    _worker(directory, me, created=1, fast=1, slow=0)
    assert snapshot.take(ROUTE, clock=lambda: 10.0).answers["created"] == 1
    _worker(directory, me, created=5, fast=1, slow=0)  # the worker counted more since
    assert snapshot.take(ROUTE, clock=lambda: 10.4).answers["created"] == 1
    assert snapshot.take(ROUTE, clock=lambda: 10.5).answers["created"] == 5


def test_no_answer_yet_still_gives_the_buckets(directory: Path) -> None:
    shot = snapshot.take(ROUTE, clock=lambda: 0.0)
    assert shot.answers == {} and shot.workers == []
    assert len(shot.buckets) == len(shot.le_ms) + 1 == len(metrics.SLO_BUCKETS) + 1
    assert set(shot.buckets) == {0}
