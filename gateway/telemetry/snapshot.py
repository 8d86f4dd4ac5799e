"""What the workers of this instance counted, read back for the ops console: one route's answers
by code and its latency histogram (every worker summed), and each live worker's breaker and
mode.

Read from the same place as `GET /metrics`: the multiprocess directory's files when
`PROMETHEUS_MULTIPROC_DIR` is set (every worker of the instance), else this process's registry.
Only the files of the three kinds needed are read (counters, histograms, live gauges), nothing
touches Redis, and the cost follows the number of workers and routes, never the SKUs or the
traffic: about a millisecond with a few workers (`bench/console_view.py`). The order path is
untouched: it keeps adding to `metrics`' plain dicts; the answering worker flushes its own first
(the others' counts are at most a second old, as in a scrape).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, multiprocess
from prometheus_client.metrics_core import Metric

from gateway.telemetry import metrics

BREAKER_NAMES = {code: name for name, code in metrics.BREAKER_CODES.items()}
_KINDS = ("counter_*.db", "histogram_*.db", "gauge_liveall_*.db")


@dataclass(frozen=True, slots=True)
class WorkerState:
    pid: int
    breaker: str  # closed | open | half_open
    mode: str | None  # the mode this worker applies: NORMAL | QUEUE_ONLY (None: not known yet)


@dataclass(slots=True)
class Snapshot:
    """`answers`: code -> answers since the instance started (workers gone included).
    `le_ms`: the latency buckets' upper bounds in milliseconds; `buckets`: cumulative counts,
    one per bound and a last one for every answer (the +Inf bucket); `sum_s`: their total."""

    answers: dict[str, int] = field(default_factory=dict)
    le_ms: list[float] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    sum_s: float = 0.0
    workers: list[WorkerState] = field(default_factory=list)


def take(route: str) -> Snapshot:
    """The answers and latency of `route` and every live worker's state, now."""
    metrics.flush()
    directory = os.environ.get(metrics.MULTIPROC_ENV)
    if directory:
        files = [f for kind in _KINDS for f in glob.glob(os.path.join(directory, kind))]
        families: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            [f for f in files if _live_or_counted(f)], accumulate=True
        )
    else:
        families = REGISTRY.collect()
    return _read(families, route, own_pid=None if directory else os.getpid())


def _live_or_counted(path: str) -> bool:
    """Counters and histograms of every worker that ever ran; gauges of live workers only."""
    name = os.path.basename(path)
    if not name.startswith("gauge_liveall_"):
        return True
    pid = name.removesuffix(".db").rsplit("_", 1)[-1]
    return pid.isdigit() and metrics.alive(int(pid))


def _read(families: Iterable[Metric], route: str, own_pid: int | None) -> Snapshot:
    shot = Snapshot()
    bounds: dict[float, int] = {}
    breakers: dict[int, str] = {}
    modes: dict[int, str] = {}
    for family in families:
        for s in family.samples:
            labels = s.labels
            if s.name == "flashgate_requests_total" and labels.get("route") == route:
                code = labels["code"]
                shot.answers[code] = shot.answers.get(code, 0) + int(s.value)
            elif s.name == "flashgate_request_duration_seconds_bucket":
                if labels.get("route") == route:
                    le = float(labels["le"])
                    bounds[le] = bounds.get(le, 0) + int(s.value)
            elif s.name == "flashgate_request_duration_seconds_sum":
                if labels.get("route") == route:
                    shot.sum_s += s.value
            elif s.name == "flashgate_breaker_state":
                breakers[_pid(labels, own_pid)] = BREAKER_NAMES.get(int(s.value), "closed")
            elif s.name == "flashgate_worker_mode_queue_only":
                modes[_pid(labels, own_pid)] = "QUEUE_ONLY" if s.value else "NORMAL"
    if not bounds:  # no answer yet: the buckets still say where they are
        bounds = dict.fromkeys((*metrics.SLO_BUCKETS, math.inf), 0)
    ordered = sorted(bounds)
    shot.le_ms = [round(b * 1000, 3) for b in ordered if b != math.inf]
    shot.buckets = [bounds[b] for b in ordered]
    shot.workers = [WorkerState(pid, breakers[pid], modes.get(pid)) for pid in sorted(breakers)]
    return shot


def _pid(labels: dict[str, str], own_pid: int | None) -> int:
    return own_pid if own_pid is not None else int(labels.get("pid", "0"))
