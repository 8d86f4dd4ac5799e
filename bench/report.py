"""The results: one scenario's figures, the headline, the machine, the tables printed and
the latency plot."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from bench.measure import Scenario

GATEWAY = ("intake", "soldout", "queue", "replay")  # the scenarios the headline is over


def paired(sc: Scenario, bare: Scenario | None, connections: int, key: str = "rps") -> list[float]:
    """The scenario's figure over bare's at one connection count, round by round (the two
    measured minutes apart, not a whole run apart: the machine drifts more than that between
    rounds). `key`: "rps" (wall clock) or "rps_per_cpu_s" (per CPU-second of the server)."""
    if bare is None:
        return []
    pairs = zip(sc.maxima.get(connections, []), bare.maxima.get(connections, []), strict=True)
    return [round(m[key] / b[key], 3) for m, b in pairs if m.get(key) and b.get(key)]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the open-loop runs at one offered rate, the one with the median p99, with every
    run's p99 beside it (the spread is part of the figure)."""
    by_p99 = sorted(runs, key=lambda r: r["latency_ms"].get("p99", math.inf))
    return {
        **by_p99[(len(by_p99) - 1) // 2],
        "p99_of_each_run": [r["latency_ms"].get("p99") for r in runs],
    }


def scenario_result(
    sc: Scenario, bare: Scenario | None, counts: list[int], trips: dict[str, float]
) -> dict[str, Any]:
    """One scenario's figures at every connection count."""
    by_count = {}
    for c in counts:
        wall, cpu = paired(sc, bare, c), paired(sc, bare, c, "rps_per_cpu_s")
        by_count[str(c)] = {
            "max_rps_median": sc.median_rps(c),
            "ratio_to_bare": statistics.median(wall) if wall else None,
            "ratio_to_bare_each_round": wall,
            "rps_per_cpu_s_median": sc.median_per_cpu(c),
            "cpu_ratio_to_bare": statistics.median(cpu) if cpu else None,
            "cpu_ratio_to_bare_each_round": cpu,
            "evalsha_per_request": statistics.median(
                m["evalsha_per_request"] for m in sc.maxima.get(c, [])
            ),
            "maxima": sc.maxima.get(c, []),
        }
    return {
        "name": sc.name,
        "title": sc.title,
        "connections": by_count,
        "round_trips_per_request": trips.get(sc.name),
        "latency": sc.latency,
    }


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst ratio to bare of the gateway's scenarios over every connection count, wall
    clock and per CPU-second: what the run is summed up by."""
    worst: dict[str, Any] = {}
    for key in ("ratio_to_bare", "cpu_ratio_to_bare"):
        found = [
            (figures[key], row["name"], int(c))
            for row in rows
            if row["name"] in GATEWAY
            for c, figures in row["connections"].items()
            if figures[key] is not None
        ]
        if found:
            ratio, name, c = min(found)
            worst[key] = {"ratio": ratio, "scenario": name, "connections": c}
    return worst


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def table(result: dict[str, Any]) -> str:
    """The throughput table (every connection count: req/s with its ratio to bare, req per
    CPU-second with its ratio) and the latency table, as docs/testing/benchmarks.md has them."""
    counts = result["method"]["connections"]
    head = "| scenario | " + " | ".join(
        f"c{c}: req/s (× bare) | c{c}: req/CPU-s (× bare)" for c in counts
    )
    rows = [head + " |", "|---|" + "---:|---:|" * len(counts)]
    for sc in result["scenarios"]:
        cells = []
        for c in counts:
            f = sc["connections"][str(c)]
            cells.append(f"{f['max_rps_median']:,.0f} ({_num(f['ratio_to_bare'])})")
            per_cpu = f["rps_per_cpu_s_median"]
            cells.append(
                f"{per_cpu or 0:,.0f} ({_num(f['cpu_ratio_to_bare'])})" if per_cpu else "-"
            )
        rows.append(f"| {sc['title']} | " + " | ".join(cells) + " |")
    if any(sc["latency"] for sc in result["scenarios"]):
        rows += [
            "",
            "| scenario | p50 / p99 / p99.9 ms at 50 % | p99 ms at 25 / 75 % "
            "| Redis round trips per req |",
            "|---|---|---|---:|",
        ]
        for sc in result["scenarios"]:
            lat = sc["latency"]
            half = lat.get("50%", {}).get("latency_ms", {})
            q = lat.get("25%", {}).get("latency_ms", {})
            t = lat.get("75%", {}).get("latency_ms", {})
            rows.append(
                f"| {sc['title']} | {half.get('p50')} / {half.get('p99')} / "
                f"{half.get('p99.9')} | {q.get('p99')} / {t.get('p99')} | "
                f"{_num(sc['round_trips_per_request'])} |"
            )
    return "\n".join(rows)


def headline_text(result: dict[str, Any]) -> str:
    worst = result["headline"]
    parts = []
    for key, what in (("ratio_to_bare", "req/s"), ("cpu_ratio_to_bare", "req per CPU-s")):
        if key in worst:
            w = worst[key]
            parts.append(f"{w['ratio']:.2f} ({what}, {w['scenario']} at c{w['connections']})")
    return "worst × bare Starlette: " + "; ".join(parts) if parts else "no ratio (bare not run)"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for sc in result["scenarios"]:
        points = sorted(
            (run["offered_rps"], run["latency_ms"]) for run in sc["latency"].values() if run
        )
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1].get("p50") for p in points], marker="o", label=sc["title"])
        axes[1].plot(xs, [p[1].get("p99") for p in points], marker="o", label=sc["title"])
    for ax, what in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel(f"{what} latency (ms, from the intended start)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(10, color="red", linestyle="--", linewidth=1, label="target p99 10 ms")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"flashgate bench, {result['when']}, {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
