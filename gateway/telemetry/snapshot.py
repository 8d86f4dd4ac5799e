"""What the workers of this instance counted, read back for the ops console: one route's answers
by code and its latency histogram (every worker summed), and each live worker's breaker and
mode.

Read from the same place as `GET /metrics`: the multiprocess directory's files when
`PROMETHEUS_MULTIPROC_DIR` is set (every worker of the instance), else this process's registry.
Only the files of the three kinds needed are read (counters, histograms, live gauges), only the
values of four families are parsed, nothing touches Redis, and the cost follows the number of
workers and routes, never the SKUs or the traffic (`python -m bench.console_view`). The order
path is untouched: it keeps adding to `metrics`' plain dicts; the answering worker flushes its
own first (the others' counts are at most a second old, as in a scrape).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY
from prometheus_client.mmap_dict import MmapedDict

from gateway.telemetry import metrics

BREAKER_NAMES = {code: name for name, code in metrics.BREAKER_CODES.items()}
_KINDS = ("counter_*.db", "histogram_*.db", "gauge_liveall_*.db")
# A value's key in a metrics file is `json.dumps([family, sample, labels, help])`: the keys of
# other families are skipped before any JSON is parsed.
_FAMILIES = tuple(
    f'["{name}", '
    for name in (
        "flashgate_requests",
        "flashgate_request_duration_seconds",
        "flashgate_breaker_state",
        "flashgate_worker_mode_queue_only",
    )
)
Sample = tuple[str, dict[str, str], float, int]  # sample name, labels, value, worker pid
SHARED_S = 0.5  # how long one reading of the files serves every console of this worker


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


def take(route: str, *, clock: Callable[[], float] = time.monotonic) -> Snapshot:
    """The answers and latency of `route` and every live worker's state. From the metrics
    directory, one reading serves every console this worker answers for `SHARED_S` (the
    other workers' counts are up to a second old anyway)."""
    metrics.flush()
    directory = os.environ.get(metrics.MULTIPROC_ENV)
    if not directory:
        return _add_up(_from_registry(), route, cumulative=True)
    now = clock()
    kept = _kept.get(route)
    if kept is None or not 0 <= now - kept[0] < SHARED_S:
        kept = _kept[route] = (now, _add_up(_from_files(directory, route), route, cumulative=False))
    return kept[1]


_kept: dict[str, tuple[float, Snapshot]] = {}  # route -> (when read, what was read)


def _from_files(directory: str, route: str) -> Iterator[Sample]:
    """The samples of the metrics files: counters and histograms of every worker that ever
    ran (per-bucket counts), gauges of the live ones."""
    of_route = f'"route": {json.dumps(route)}'
    for path in (f for kind in _KINDS for f in glob.glob(os.path.join(directory, kind))):
        stem = os.path.basename(path).removesuffix(".db")
        pid = int(stem.rsplit("_", 1)[-1])
        gauge = stem.startswith("gauge_")
        if gauge and not metrics.alive(pid):
            continue  # a worker gone: `metrics.render` drops its file at the next scrape
        try:
            values = MmapedDict.read_all_values_from_file(path)  # type: ignore[no-untyped-call]
        except FileNotFoundError:  # removed since the glob
            continue
        for key, value, _, _ in values:
            if key.startswith(_FAMILIES) and (gauge or of_route in key):
                _, name, labels, _ = json.loads(key)
                yield name, labels, value, pid


def _from_registry() -> Iterator[Sample]:
    """This process's samples (histogram buckets cumulative), when there is no directory."""
    pid = os.getpid()
    for family in REGISTRY.collect():
        for s in family.samples:
            yield s.name, s.labels, s.value, pid


def _add_up(samples: Iterator[Sample], route: str, *, cumulative: bool) -> Snapshot:
    shot = Snapshot()
    bounds = dict.fromkeys((*metrics.SLO_BUCKETS, math.inf), 0)
    breakers: dict[int, str] = {}
    modes: dict[int, str] = {}
    for name, labels, value, pid in samples:
        if name == "flashgate_breaker_state":
            breakers[pid] = BREAKER_NAMES.get(int(value), "closed")
        elif name == "flashgate_worker_mode_queue_only":
            modes[pid] = "QUEUE_ONLY" if value else "NORMAL"
        elif labels.get("route") != route:
            continue
        elif name == "flashgate_requests_total":
            shot.answers[labels["code"]] = shot.answers.get(labels["code"], 0) + int(value)
        elif name == "flashgate_request_duration_seconds_bucket":
            le = float(labels["le"])
            bounds[le] = bounds.get(le, 0) + int(value)
        elif name == "flashgate_request_duration_seconds_sum":
            shot.sum_s += value
    ordered = sorted(bounds)
    shot.le_ms = [round(b * 1000, 3) for b in ordered if b != math.inf]
    counts = [bounds[b] for b in ordered]
    if not cumulative:
        for i in range(1, len(counts)):
            counts[i] += counts[i - 1]
    shot.buckets = counts
    shot.workers = [WorkerState(pid, breakers[pid], modes.get(pid)) for pid in sorted(breakers)]
    return shot
