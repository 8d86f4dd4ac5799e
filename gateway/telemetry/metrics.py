"""Prometheus metrics: `GET /metrics`, one coherent view of every worker of an instance.

Two sources:
- what each worker counts as it serves (requests and answers, latencies, the breaker, the token
  bucket, the mode it applies): prometheus-client objects. Under `flashgate gateway` /
  `serve`, `PROMETHEUS_MULTIPROC_DIR` is set before any worker starts
  (`ops.launch.prepare_multiprocess`), so every worker writes its own files there and the
  worker answering a scrape adds them all up. Counters of a worker that died stay in the sum (a
  counter must never go back); its per-process gauges are dropped at the next scrape. Without
  the variable (tests, an app embedded elsewhere) the process's own registry is served.
- what Redis holds, read by the worker that answers: the shared intake mode and, per SKU,
  stock, available, held, sold, active holds, backlog, entries pending at a finalizer, dead
  letters, drain rate, a fair start's draw (`gateway.store.figures.Sampler`, the same
  figures as `flashgate status`), at most `FLASHGATE_FIGURES_MAX_AGE_MS` old: two Redis round
  trips per pass, whatever the number of SKUs; per relay group, its lag and the age of its
  oldest unconfirmed event, as the relays wrote them. SKU and relay labels only, never users.

The hot path adds to plain dicts; each worker writes its counts to prometheus-client once a
second and before a scrape it answers (`flush`), so another worker's counts may be up to a
second old in a scrape.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway.store import figures
from gateway.telemetry import (  # noqa: F401  (registered: every scrape shows them)
    drawing,
    queueing,
)
from gateway.transport.replies import REDIS_FAILURES

log = logging.getLogger("flashgate")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets at the SLOs: p99 <= 10 ms at half of max (bench/), the breaker's 800 ms
SLO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "flashgate_requests_total",
    "HTTP requests answered, by route, status and answer code (error code, or created / "
    "replayed / ok)",
    ["route", "status", "code"],
)
LATENCY = Histogram(
    "flashgate_request_duration_seconds",
    "Time from the request's first byte reaching the app to its answer, by route",
    ["route"],
    buckets=SLO_BUCKETS,
)
SCRIPT_LATENCY = Histogram(
    "flashgate_redis_script_duration_seconds",
    "Round trip of one order or payment script call (resend included), by script",
    ["script"],
    buckets=SLO_BUCKETS,
)
BREAKER_TRANSITIONS = Counter(
    "flashgate_breaker_transitions_total", "Circuit breaker transitions, by new state", ["to"]
)
BUCKET_REFUSALS = Counter(
    "flashgate_token_bucket_refusals_total", "Orders refused by the token bucket (429)"
)
CLIENT_REFUSALS = Counter(
    "flashgate_client_refusals_total",
    "Orders refused by a user's or a client address's bucket (429 client_rate_limited)",
    ["limit"],
)
RELAY_DELIVERED = Counter(
    "flashgate_relay_delivered_total",
    "Events the relay's target confirmed, by target and event",
    ["target", "event"],
)
RELAY_RETRIES = Counter(
    "flashgate_relay_retries_total",
    "Deliveries the relay tries again (the target refused or could not be reached)",
)
RELAY_DEAD = Counter(
    "flashgate_relay_dead_total",
    "Events moved to the relay's dead letters (refused too often, or not an event)",
)
BREAKER_CODES = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(frozen=True)
class WorkerGauges:
    """A gateway worker's own state, one series per live worker: its breaker (0 closed, 1 open,
    2 half-open), the runtime rules' version and whether it applies QUEUE_ONLY."""

    breaker: Gauge
    rules_version: Gauge
    queue_only: Gauge


@functools.cache
def worker() -> WorkerGauges:
    """The worker gauges, made by the first gateway code that sets one, not at import: a gauge
    without labels writes its series the moment it exists, and the relay, which imports this
    module and shares the instance's metrics directory, would then show in `GET /metrics` and
    in the console as one more gateway worker (breaker closed, rules version 0)."""
    return WorkerGauges(
        breaker=Gauge(
            "flashgate_breaker_state",
            "This worker's circuit breaker: 0 closed, 1 open, 2 half-open",
            multiprocess_mode="liveall",
        ),
        rules_version=Gauge(
            "flashgate_rules_version",
            "Version of the runtime rules this worker applies",
            multiprocess_mode="liveall",
        ),
        queue_only=Gauge(
            "flashgate_worker_mode_queue_only",
            "1 when this worker applies QUEUE_ONLY, 0 for NORMAL",
            multiprocess_mode="liveall",
        ),
    )


# This process's counts not yet written to prometheus-client's values: the hot path adds to
# plain dicts (well under a microsecond), `flush` writes them once a second and before every
# scrape. Writing each answer through prometheus-client cost about 3 µs a request in
# multiprocess mode (a locked write to a memory-mapped file per value), 5 % of intake.
_BOUNDS = (*SLO_BUCKETS, math.inf)
_answers: dict[tuple[str, int, str], int] = {}
_observed: dict[tuple[Histogram, str], list[float]] = {}  # bucket counts..., then the sum


def answered(route: str, status_code: int, code: str, seconds: float) -> None:
    """Count one answer and its latency."""
    key = (route, status_code, code)
    _answers[key] = _answers.get(key, 0) + 1
    observe(LATENCY, route, seconds)


def observe(histogram: Histogram, label: str, seconds: float) -> None:
    """One observation of `histogram` with its one label, written at the next flush."""
    tally = _observed.get((histogram, label))
    if tally is None:
        tally = _observed[histogram, label] = [0.0] * (len(_BOUNDS) + 1)
    tally[bisect.bisect_left(_BOUNDS, seconds)] += 1
    tally[-1] += seconds


def flush() -> None:
    """Write what this process counted since the last flush (taken first: a write that
    fails loses those counts, it never counts them twice)."""
    answers, observed = dict(_answers), dict(_observed)
    _answers.clear()
    _observed.clear()
    for (route, status_code, code), n in answers.items():
        REQUESTS.labels(route, str(status_code), code).inc(n)
    for (histogram, label), tally in observed.items():
        child = histogram.labels(label)
        # prometheus-client keeps a histogram's buckets uncumulated (`observe` adds 1 to the
        # first bucket whose bound holds the value) and cumulates them when collected
        for bucket, count in zip(child._buckets, tally, strict=False):
            if count:
                bucket.inc(count)
        child._sum.inc(tally[-1])


async def flush_every(seconds: float) -> None:
    """The worker's flushing task (started by the app's lifespan); flushes once more when
    cancelled."""
    try:
        while True:
            await asyncio.sleep(seconds)
            try:
                flush()
            except Exception:  # e.g. the metrics directory's disk full: keep serving
                log.exception("writing the metrics failed")
    finally:
        with contextlib.suppress(Exception):
            flush()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_workers(directory: str) -> None:
    """Drop the per-process gauges of workers that are gone (their counters stay)."""
    pids = set()
    for name in os.listdir(directory):
        stem = name.rsplit(".", 1)[0]
        tail = stem.rsplit("_", 1)[-1]
        if name.endswith(".db") and tail.isdigit():
            pids.add(int(tail))
    for pid in pids:
        if not alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_PER_SKU = (
    ("stock", "Total units of the sale"),
    ("available", "Units free to hold"),
    ("held", "Units held by unpaid orders"),
    ("sold", "Units sold (paid and confirmed)"),
    ("holds", "Active holds (orders holding units)"),
    ("backlog", "Orders in the SKU's stream no finalizer has decided yet"),
    ("pending", "Stream entries delivered to a finalizer, not yet acknowledged"),
    ("dead", "Dead letters (entries that failed repeatedly)"),
    ("drain_rate", "Orders the finalizers decide per second while orders wait (an EWMA)"),
)
_rendered: tuple[figures.Sample | None, bytes] = (None, b"")  # the last sample, as text


def figures_text(sample: figures.Sample | None) -> bytes:
    """What Redis holds, in the exposition format: `flashgate_redis_up`, the mode and each
    SKU's gauges. Written here rather than through prometheus-client (ten times the time at
    10,000 SKUs), once per sample: scrapes that share a sample share the text. SKU ids need no
    escaping in a label value: they are `[A-Za-z0-9_.:-]` (gateway/schemas.py)."""
    global _rendered
    if sample is not None and _rendered[0] is sample:
        return _rendered[1]
    lines = [
        "# HELP flashgate_redis_up 1 when Redis answered this scrape",
        "# TYPE flashgate_redis_up gauge",
        f"flashgate_redis_up {0.0 if sample is None else 1.0}",
    ]
    if sample is not None:
        lines += [
            "# HELP flashgate_intake_mode The intake mode every gateway applies (1 = current)",
            "# TYPE flashgate_intake_mode gauge",
        ]
        for name in ("NORMAL", "QUEUE_ONLY"):
            lines.append(f'flashgate_intake_mode{{mode="{name}"}} {float(sample.mode == name)}')
        heads = _series_heads(sample.skus)
        for field, about in _PER_SKU:
            name = f"flashgate_sku_{field}"
            lines += [f"# HELP {name} {about}", f"# TYPE {name} gauge"]
            if sample.skus:
                values = tuple(map(attrgetter(field), sample.skus))
                lines.append(_gauge_values(name, heads[name], values))
        lines += _draw_lines(sample)
        lines += _relay_lines(sample)
    text = ("\n".join(lines) + "\n").encode()
    if sample is not None:
        _rendered = (sample, text)
    return text


# SKU ids, series heads: tuples of strings, which the collector stops tracking
_heads: tuple[tuple[str, ...], dict[str, tuple[str, ...]]] = ((), {})


def _series_heads(skus: list[figures.SkuSample]) -> dict[str, tuple[str, ...]]:
    """Each per-SKU gauge's `name{sku="..."} ` of every SKU, in order: made again only when
    the SKUs change."""
    global _heads
    ids = tuple(s.sku_id for s in skus)
    if ids != _heads[0]:
        labels = [f'{{sku="{sku_id}"}} ' for sku_id in ids]
        names = [f"flashgate_sku_{field}" for field, _ in _PER_SKU]
        _heads = (ids, {name: tuple([name + label for label in labels]) for name in names})
    return _heads[1]


# a gauge's last heads, values and text
_written: dict[str, tuple[tuple[str, ...], tuple[Any, ...], str]] = {}


def _gauge_values(name: str, heads: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """One line per head with its value, as `float(value)` writes it: integers below 2**53
    as `<int>.0` (the same text, a third of the time). The gauge's last text when neither the
    SKUs nor the values changed (most SKUs are idle)."""
    last = _written.get(name)
    if last is not None and last[0] is heads and last[1] == values:
        return last[2]
    if set(map(type, values)) == {int} and -(2**53) < min(values) and max(values) < 2**53:
        text = "".join(chain.from_iterable(zip(heads, map(str, values), repeat(".0\n"))))
    else:
        text = "".join(chain.from_iterable(zip(heads, map(repr, map(float, values)), repeat("\n"))))
    _written[name] = (heads, values, text[:-1])  # the lines are joined with the others'
    return text[:-1]


_DRAW_GAUGES = (
    ("prequeued", "Orders in the fair start's pre-queue (fixed once its draw opens)"),
    ("drawn", "Pre-queued orders the fair start's draw decided so far"),
)


def _draw_lines(sample: figures.Sample) -> list[str]:
    """The fair-start SKUs' draws (the others have none: no line): the state, 1 for the
    current one of pending / drawing / done, and the pre-queued and decided counts."""
    drawn = [s for s in sample.skus if s.draw != "none"]
    state = "flashgate_sku_draw_state"
    lines = [
        f"# HELP {state} The fair start's draw (1 = current state: pending, drawing, done)",
        f"# TYPE {state} gauge",
    ]
    for s in drawn:
        lines += [
            f'{state}{{sku="{s.sku_id}",state="{name}"}} {float(s.draw == name)}'
            for name in figures.DRAW_STATES[1:]
        ]
    for field, about in _DRAW_GAUGES:
        name = f"flashgate_sku_draw_{field}"
        lines += [f"# HELP {name} {about}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{sku="{s.sku_id}"}} {float(getattr(s, field))}' for s in drawn]
    return lines


def _relay_lines(sample: figures.Sample) -> list[str]:
    """Each relay group's lag as its relays last wrote it (`fg:{mode}:relay-lag`, about once a
    second): nothing is measured per scrape. Group names are `relay:<kind>:<hex>`."""
    lag, oldest = "flashgate_relay_lag", "flashgate_relay_oldest_unconfirmed_seconds"
    lines = [
        f"# HELP {lag} Events the relay group's target has not confirmed yet (handed out or"
        " not), all streams",
        f"# TYPE {lag} gauge",
    ]
    labels = [f'{{target="{r.target}",group="{r.group}"}} ' for r in sample.relays]
    lines += [f"{lag}{label}{float(r.lag)}" for label, r in zip(labels, sample.relays, strict=True)]
    lines += [
        f"# HELP {oldest} Age of the oldest event the relay group's target has not confirmed"
        " (0: none)",
        f"# TYPE {oldest} gauge",
    ]
    now_ms = int(time.time() * 1000)
    lines += [
        f"{oldest}{label}{float(r.oldest_age_s(now_ms))}"
        for label, r in zip(labels, sample.relays, strict=True)
    ]
    return lines


async def render(sampler: figures.Sampler) -> bytes:
    """The whole exposition: every worker's metrics, then what Redis holds (the sampler's
    sample, at most its `max_age_s` old)."""
    flush()  # this worker's own counts are exact; the others' at most a second old
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        _forget_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
        workers = generate_latest(registry)
    else:
        workers = generate_latest(REGISTRY)
    try:
        sample: figures.Sample | None = await sampler.sample()
    except (*REDIS_FAILURES, ValueError):  # Redis down (or a record unreadable): redis_up 0
        sample = None
    if sample is not None and _rendered[0] is not sample:  # tens of ms at 10,000 SKUs
        return workers + await asyncio.to_thread(figures.paused, figures_text, sample)
    return workers + figures_text(sample)
