"""The benchmark: flashgate against the limits of its own stack, on one machine, in one run.

    python -m bench                # about 10 minutes; --quick for a 1-minute smoke run

Starts what it needs: the embedded server (same settings as `flashgate serve`) pinned with Redis
and the load generators to the last core, and, pinned alone to the first core, the server under
test: the bare Starlette endpoint, the gateway (one worker), the naive four-step service. Then:

1. closed-loop maximums with wrk (`-t1 -c256`), the scenarios interleaved (A B C … A B C …),
   `--rounds` times, medians reported with requests per CPU-second of the server process;
2. open-loop latency (`bench.openloop`, fixed offered rate, latency from each intended start)
   at 25/50/75 % of each scenario's median maximum, interleaved the same way, `--rounds`
   times; the run with the median p99 is reported, with every run's p99;
3. Redis round trips per accepted order (INFO commandstats) and Redis memory per held order
   (used_memory over a batch of accepted orders, idempotency record included);
4. the naive design against flashgate on one small stock under the same load: accepted orders
   against stock (oversold).

Writes `bench/results/<stamp>.json`, `bench/results/latest.json`, `bench/results/latency.png`,
and prints the results table that docs/testing/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import Bench, Scenario, scenarios
from bench.report import headline, headline_text, machine, median_run, plot, scenario_result, table
from bench.stack import RESULTS, Stack


def measure_maxima(bench: Bench, scs: list[Scenario], args: argparse.Namespace) -> None:
    """Closed-loop maximums: every connection count, every scenario, `rounds` times; within a
    round the scenarios of one connection count run back to back, in a new rotation each
    round, so a scenario and bare are always measured minutes apart at most."""
    for sc in scs:  # warm-up: imports, caches, connections
        bench.reset()
        bench.closed_max(sc, min(2.0, args.seconds), args.connections[-1])
    for r in range(args.rounds):
        for connections in args.connections:
            for sc in scs[r % len(scs) :] + scs[: r % len(scs)]:
                bench.reset()
                got = bench.closed_max(sc, args.seconds, connections)
                sc.maxima.setdefault(connections, []).append(got)
                print(f"c{connections} {sc.name}: {got['rps']:,.0f}/s", file=sys.stderr)


def measure_latency(bench: Bench, scs: list[Scenario], args: argparse.Namespace) -> None:
    """Open loop at 25/50/75 % of each scenario's maximum at the largest connection count
    (the open loop's own 256 connections)."""
    fracs = (0.25, 0.5, 0.75)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    top = args.connections[-1]
    for r in range(args.rounds):
        for frac in fracs:
            for sc in scs[r % len(scs) :] + scs[: r % len(scs)]:
                rate = round(sc.median_rps(top) * frac, 1)
                bench.reset()
                run_ = bench.open_loop(sc, rate, args.latency_seconds)
                runs.setdefault((sc.name, f"{int(frac * 100)}%"), []).append(run_)
                p99 = run_["latency_ms"].get("p99")
                print(f"{sc.name} @ {frac:.0%}: p99 {p99} ms", file=sys.stderr)
    for sc in scs:
        for frac in fracs:
            sc.latency[f"{int(frac * 100)}%"] = median_run(runs[sc.name, f"{int(frac * 100)}%"])


def open_loop_phase(
    stack: Stack, bench: Bench, scs: list[Scenario], args: argparse.Namespace
) -> bool:
    """The open-loop latencies, with Redis first on its core unless `--no-redis-first`
    (`Stack.redis_first`; the maxima before are taken at normal priority: a load generator
    starved by Redis would lower them). Whether Redis was first."""
    first = args.redis_first and stack.redis_first(True)
    try:
        measure_latency(bench, scs, args)
    finally:
        if first:
            stack.redis_first(False)
    return first


def method(args: argparse.Namespace, stack: Stack, redis_first: bool) -> dict[str, Any]:
    return {
        "server_cpu": stack.server_cpu,
        "gateway_workers": args.workers,
        "redis_malloc": stack.embedded.malloc,
        "redis_in_open_loop": "real-time priority (SCHED_FIFO 1)" if redis_first else "normal",
        "load_and_redis_cpu": stack.load_cpu,
        "rounds": args.rounds,
        "connections": args.connections,
        "seconds_per_max_run": args.seconds,
        "seconds_per_latency_run": args.latency_seconds,
        "latency": "median run of `rounds` by p99, rounds interleaved",
        "wrk": "wrk -t1 -c<connections>, closed loop",
        "open_loop": "bench.openloop, 256 connections, latency from the intended start",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is needed for the closed-loop maximums (apt install wrk)")
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = cpus[0], cpus[-1]
    with tempfile.TemporaryDirectory(prefix="flashgate-bench-") as tmp:
        stack = Stack(Path(tmp), server_cpu, load_cpu, args.workers, args.malloc)
        redis_first = False
        try:
            stack.start()
            bench = Bench(stack, args)
            scs = [sc for sc in scenarios() if not args.only or sc.name in args.only]
            measure_maxima(bench, scs, args)
            if "latency" in args.phases:
                redis_first = open_loop_phase(stack, bench, scs, args)
            profiles: dict[str, Any] = {}
            for sc in scs if "profile" in args.phases else ():
                if sc.name in ("bare", "intake", "soldout"):
                    bench.reset()
                    profiles[sc.name] = bench.profile(sc, args.seconds, 64)
            bench.reset()
            trips = bench.round_trips(args.trip_requests) if "trips" in args.phases else {}
            bench.reset()
            memory = bench.memory_per_order(args.memory_orders) if "memory" in args.phases else {}
            race = (
                bench.oversell(args.race_stock, min(3.0, args.seconds))
                if "race" in args.phases
                else {}
            )
        finally:
            stack.stop()
        server_log = (Path(tmp) / "valkey" / "valkey.log").read_text(errors="replace")
    warnings = [ln for ln in server_log.splitlines() if "fsync" in ln or "rewrit" in ln.lower()]
    bare_sc = next((sc for sc in scs if sc.name == "bare"), None)
    rows = [scenario_result(sc, bare_sc, args.connections, trips) for sc in scs]
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "method": method(args, stack, redis_first),
        "headline": headline(rows),
        "scenarios": rows,
        "round_trips_per_request": trips,
        "profiles": profiles,
        "memory": memory,
        "server_log_fsync_and_rewrite": warnings[-20:],
        "oversell": race,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="closed-loop runs per scenario")
    p.add_argument("--seconds", type=float, default=5.0, help="length of one closed-loop run")
    p.add_argument("--latency-seconds", type=float, default=5.0, help="one open-loop run")
    p.add_argument(
        "--connections",
        type=lambda v: sorted(int(c) for c in v.split(",")),
        default=[16, 64, 256],
        help="comma-separated wrk connection counts (every scenario at each)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the gateway's worker processes, all pinned to the server's one core",
    )
    p.add_argument(
        "--no-redis-first",
        dest="redis_first",
        action="store_false",
        help="keep Redis at normal priority in the open loop, on the core it shares with the"
        " load generator",
    )
    p.add_argument(
        "--malloc",
        choices=["mimalloc", "libc"],
        default="mimalloc",
        help="the embedded server's allocator (FLASHGATE_EMBEDDED_ALLOCATOR)",
    )
    p.add_argument("--replay-keys", type=int, default=500)
    p.add_argument("--memory-orders", type=int, default=20_000)
    p.add_argument("--race-stock", type=int, default=1000)
    p.add_argument("--trip-requests", type=int, default=2000)
    p.add_argument(
        "--only",
        type=lambda v: v.split(","),
        help="comma-separated scenarios (bare,direct,intake,soldout,queue,replay,naive)",
    )
    p.add_argument(
        "--phases",
        type=lambda v: v.split(","),
        default=["max", "latency", "profile", "trips", "memory", "race"],
        help="comma-separated: max,latency,profile,trips,memory,race (max always runs)",
    )
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test of the bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.latency_seconds = 1, 2.0, 2.0
        args.replay_keys, args.memory_orders = 100, 4000
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=2)
    (args.out / f"{stamp}.json").write_text(text)
    (args.out / "latest.json").write_text(text)
    if "latency" in args.phases:
        plot(result, args.out / "latency.png")
    print(headline_text(result))
    print(table(result))
    if mem := result["memory"]:
        print(f"\nRedis memory per held order: {mem['bytes_per_order']:.0f} bytes", end=" ")
        print(f"({mem['orders_held']} orders)")
    if race := result["oversell"]:
        naive, fg = race["naive"], race["flashgate"]
        print(f"Oversell on stock {race['stock']}: naive accepted {naive['accepted']}", end=" ")
        print(f"(oversold {naive['oversold']}), flashgate accepted {fg['accepted']}", end=" ")
        print(f"(oversold {fg['oversold']})")
    print(f"\nwrote {args.out / 'latest.json'}")
    return 0
