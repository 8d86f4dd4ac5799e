"""Locust's CSV reports read back: totals, answers by status and code, unexpected failures."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Request names end with the answer: `create hot [409 sold_out]`, `GET /order/:id [200 HELD]`.
_ANSWER = re.compile(r"\[(\d+)(?: ([^\]]*))?\]$")


@dataclass
class LocustStats:
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    median_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    by_status: Counter[str] = field(default_factory=Counter)
    by_answer: Counter[str] = field(default_factory=Counter)
    by_name: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (requests, fails)
    failure_rows: list[tuple[str, str, int]] = field(default_factory=list)  # name, error, n
    exceptions: int = 0  # errors raised in the locustfile itself (not answers)
    exception_rows: list[tuple[str, int]] = field(default_factory=list)  # message, n


def _num(row: dict[str, str], column: str) -> float:
    try:
        return float(row.get(column) or 0)
    except ValueError:
        return 0.0


def read_locust(prefix: Path) -> LocustStats:
    """`<prefix>_stats.csv` and `<prefix>_failures.csv` as written by `locust --csv <prefix>`."""
    stats = LocustStats()
    stats_csv = prefix.with_name(prefix.name + "_stats.csv")
    if not stats_csv.exists():
        return stats
    with open(stats_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name, count = row["Name"], int(_num(row, "Request Count"))
            fails = int(_num(row, "Failure Count"))
            if name == "Aggregated":
                stats.requests, stats.failures = count, fails
                stats.rps = _num(row, "Requests/s")
                stats.median_ms = _num(row, "Median Response Time")
                stats.p95_ms, stats.p99_ms = _num(row, "95%"), _num(row, "99%")
                continue
            full = f"{row['Type']} {name}"
            stats.by_name[full] = (count, fails)
            if m := _ANSWER.search(name):
                stats.by_status[m.group(1)] += count
                stats.by_answer[f"{m.group(1)} {m.group(2) or ''}".strip()] += count
            else:
                stats.by_status["other"] += count
    failures_csv = prefix.with_name(prefix.name + "_failures.csv")
    if failures_csv.exists():
        with open(failures_csv, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                n = int(_num(row, "Occurrences"))
                stats.failure_rows.append((f"{row['Method']} {row['Name']}", row["Error"], n))
    stats.failure_rows.sort(key=lambda r: -r[2])
    exceptions_csv = prefix.with_name(prefix.name + "_exceptions.csv")
    if exceptions_csv.exists():
        with open(exceptions_csv, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                n = int(_num(row, "Count"))
                stats.exceptions += n
                stats.exception_rows.append((row["Message"], n))
    return stats


def report_files(prefix: Path, html: Path) -> list[Path]:
    names = ("_stats.csv", "_stats_history.csv", "_failures.csv", "_exceptions.csv")
    return [html, *(prefix.with_name(prefix.name + n) for n in names)]
