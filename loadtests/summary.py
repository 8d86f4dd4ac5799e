"""What the run prints: Locust's figures, the honest shoppers' and the scalpers' creates, and
the findings of the checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.report import LocustStats
from loadtests.verify import Findings

LATENCY = "latency.json"  # per Locust process: latency.json.<pid>


def percentile(histogram: dict[int, int], share: float) -> int | None:
    """The smallest whole ms at or under which `share` of the requests were answered."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= share * total:
            return ms
    return max(histogram)


def groups(out: Path, stats: LocustStats) -> dict[str, Any]:
    """Honest shoppers' and scalpers' creates: how many, how they were answered, p50/p99."""
    merged: dict[str, dict[int, int]] = {"honest": {}, "scalper": {}}
    for path in out.glob(LATENCY + ".*"):
        for group, hist in json.loads(path.read_text(encoding="utf-8")).items():
            for ms, n in hist.items():
                merged[group][int(ms)] = merged[group].get(int(ms), 0) + n
    found: dict[str, Any] = {}
    for group, hist in merged.items():
        answers: dict[str, int] = {}
        for name, (count, _) in stats.by_name.items():
            if not name.startswith("POST create ") or "[" not in name:
                continue
            if name.startswith("POST create scalper") != (group == "scalper"):
                continue
            answer = name.rsplit("[", 1)[1].rstrip("]")
            answers[answer] = answers.get(answer, 0) + count
        found[group] = {
            "creates": sum(answers.values()),
            "accepted": sum(n for a, n in answers.items() if a.startswith("202")),
            "client_rate_limited": answers.get("429 client_rate_limited", 0),
            "p50_ms": percentile(hist, 0.5),
            "p99_ms": percentile(hist, 0.99),
            "answers": dict(sorted(answers.items())),
        }
    return found


def print_groups(found: dict[str, Any]) -> None:
    """One line per group that sent creates (no scalper line in a run without scalpers)."""
    for group, g in found.items():
        if not g["creates"]:
            continue
        print(
            f"{group} creates: {g['creates']}, accepted {g['accepted']}, 429"
            f" client_rate_limited {g['client_rate_limited']}; p50 {g['p50_ms']} ms,"
            f" p99 {g['p99_ms']} ms"
        )


def print_locust(stats: LocustStats, seconds: float) -> None:
    print(
        f"requests: {stats.requests} in {seconds:.1f} s, {stats.rps:.0f} requests/s; "
        f"median {stats.median_ms:.0f} ms, p95 {stats.p95_ms:.0f} ms, p99 {stats.p99_ms:.0f} ms"
    )
    print("by status: " + ", ".join(f"{k}: {n}" for k, n in sorted(stats.by_status.items())))
    print("by answer:")
    for answer, n in sorted(stats.by_answer.items()):
        print(f"  {answer:<32} {n:>9}")
    print(f"unexpected answers (Locust failures): {stats.failures}")
    for name, error, n in stats.failure_rows[:15]:
        print(f"  {n:>6} x {name}: {error[:160]}")
    print(f"errors in the locustfile (Locust exceptions): {stats.exceptions}")
    for message, n in stats.exception_rows[:5]:
        print(f"  {n:>6} x {message[:160]}")


def print_findings(f: Findings) -> None:
    print("SKU figures after the drain:")
    print(f"  {'sku':<8} {'stock':>7} {'available':>9} {'held':>7} {'sold':>7} {'backlog':>7}")
    for sku, fig in f.skus.items():
        print(
            f"  {sku:<8} {fig['stock']:>7} {fig['available']:>9} {fig['held']:>7} "
            f"{fig['sold']:>7} {fig['backlog']:>7}"
        )
    statuses = ", ".join(f"{k}: {n}" for k, n in sorted(f.statuses.items()))
    print(f"order records in Redis: {f.records} ({statuses})")
    print(
        f"recorded 202 answers: {f.recorded} ({f.orders} orders, {f.replays} replays), "
        f"recorded payments: {f.payments}"
    )
    for name, items in (
        ("oversold", f.oversold),
        ("duplicate", f.duplicate),
        ("lost", f.lost),
        ("unsettled", f.unsettled),
    ):
        print(f"{name}: {len(items)}")
        for subject, reasons in list(items.items())[:10]:
            print(f"  {subject}: {'; '.join(reasons)[:200]}")
