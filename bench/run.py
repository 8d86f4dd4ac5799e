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
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench.countproxy import CountingProxy
from gateway.ops.embedded import EmbeddedServer, free_port

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADMIN_TOKEN = "bench-admin-token"
ORDER = "/api/v1/order/create"
PROMO = "bench"


@dataclass
class Scenario:
    name: str
    title: str
    server: str  # bare | gateway | naive | direct
    sku: str = "bench-intake"
    kind: str = "unique"
    queue_only: bool = False
    maxima: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # by connections
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)

    def median_rps(self, connections: int) -> float:
        runs = self.maxima.get(connections, [])
        return statistics.median(m["rps"] for m in runs) if runs else 0.0

    def median_per_cpu(self, connections: int) -> float | None:
        runs = [m["rps_per_cpu_s"] for m in self.maxima.get(connections, [])]
        return statistics.median(r for r in runs if r) if any(runs) else None


def scenarios() -> list[Scenario]:
    return [
        Scenario("bare", "(a) bare Starlette endpoint", "bare"),
        Scenario("direct", "(b) hold script, called directly", "direct", sku="bench-direct"),
        Scenario("intake", "(c) accepted-order intake", "gateway"),
        Scenario("soldout", "(d) sold-out path", "gateway", sku="bench-soldout"),
        Scenario("queue", "(e) QUEUE_ONLY intake", "gateway", queue_only=True),
        Scenario("replay", "(f) replays", "gateway", sku="bench-replay", kind="replay"),
        Scenario("naive", "(g) naive four steps", "naive", sku="bench-naive"),
    ]


# --------------------------------------------------------------------------- processes


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def wait_port(port: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far, with its live children's (the workers
    of a `--workers` > 1 gateway)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        fields = tail.split()
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # itself, or a child
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Stack:
    """Every process the benchmark starts; stopped together, whatever happens."""

    def __init__(self, work: Path, server_cpu: int, load_cpu: int, workers: int = 1) -> None:
        self.work = work
        self.workers = workers
        self.server_cpu = server_cpu
        self.load_cpu = load_cpu
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.embedded = EmbeddedServer(work / "valkey")
        self.redis_url = ""
        self.proxy: CountingProxy | None = None

    def start(self) -> None:
        self.redis_url = self.embedded.start()
        assert self.embedded.proc is not None
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(self.load_cpu), str(self.redis_pid())],
            check=True,
            capture_output=True,
        )
        uvicorn = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--no-proxy-headers",  # the settings `flashgate gateway` runs uvicorn with
            "--no-server-header",
        ]
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_QPS": "1000000000",
            "FLASHGATE_BURST": "1000000000",
            "FLASHGATE_QUEUE_MAX": "1000000000",
            "FLASHGATE_LOG_LEVEL": "warning",
            "FLASHGATE_WORKERS": str(self.workers),  # all of them on the server's one core
            "PYTHONPATH": str(HERE.parent),
        }
        self.proxy = CountingProxy(self.redis_url)
        counted_url = self.proxy.start()
        for name, argv in (
            ("bare", [*uvicorn, "bench.apps:bare_app"]),
            ("naive", [*uvicorn, "bench.apps:naive_app"]),
            ("gateway", [sys.executable, "-m", "gateway", "gateway"]),
            ("counted", [sys.executable, "-m", "gateway", "gateway"]),  # Redis via the proxy
        ):
            port = self.ports[name] = free_port()
            extra = ["--port", str(port)]
            proc_env = {**env, "FLASHGATE_PORT": str(port)}
            if name == "counted":
                proc_env["REDIS_URL"] = counted_url
            self.procs[name] = subprocess.Popen(
                pinned(self.server_cpu, argv + (extra if argv[2] == "uvicorn" else [])),
                env=proc_env,
                cwd=self.work,
                start_new_session=True,
            )
        for port in self.ports.values():
            wait_port(port)

    def redis_pid(self) -> int:
        assert self.embedded.proc is not None
        return self.embedded.proc.pid

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.embedded.stop()
        if self.proxy is not None:
            self.proxy.stop()


# --------------------------------------------------------------------------- HTTP helpers


def http(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def put_sku(port: int, sku: str, stock: int, per_user_limit: int = 1) -> None:
    status, body = http(
        port,
        "PUT",
        f"/api/v1/admin/skus/{sku}",
        {"promotion_id": PROMO, "stock": stock, "per_user_limit": per_user_limit},
        admin(),
    )
    if status not in (200, 201):
        raise RuntimeError(f"PUT {sku}: {status} {body}")


def order(port: int, sku: str, user: str, key: str) -> tuple[int, dict[str, Any]]:
    return http(
        port,
        "POST",
        ORDER,
        {"user_id": user, "sku_id": sku, "quantity": 1, "promotion_id": PROMO},
        {"X-Idempotency-Key": key},
    )


def settled(port: int, sku: str, user: str, key: str | None = None) -> int:
    """An order's status once the gateway is not refusing for overload: a busy machine can
    open the breaker in the run before (503 busy, for its open time), which is not this
    order's answer."""
    key = key or str(uuid.uuid4())
    deadline = time.monotonic() + 30
    while True:
        status = order(port, sku, user, key)[0]
        if status not in (429, 503) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def switch(port: int, mode: str) -> None:
    status, body = http(port, "POST", f"/api/v1/order/switch?mode={mode}", None, admin())
    if status != 200:
        raise RuntimeError(f"switch to {mode}: {status} {body}")
    time.sleep(0.05)


# --------------------------------------------------------------------------- measuring


class Bench:
    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.redis = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
        self.pairs = stack.work / "replay-pairs.txt"
        self.run_ids = (f"{i:08x}" for i in range(int(time.time()) & 0xFFFFFF << 8, 1 << 32))

    def reset(self) -> None:
        """Every run starts from the same state: an empty database, the SKUs configured again.
        Without it the data of earlier runs grows the dataset, and the server's AOF rewrite
        (a fork, on the load core) lands inside later runs."""
        self.redis.flushall()
        self.redis.bgrewriteaof()  # a small AOF again: no automatic rewrite inside the run
        while int(self.redis.info("persistence").get("aof_rewrite_in_progress", 0)):
            time.sleep(0.05)
        self.prepare()

    def prepare(self) -> None:
        gw = self.stack.ports["gateway"]
        put_sku(gw, "bench-intake", 1_000_000_000)
        put_sku(gw, "bench-direct", 1_000_000_000)
        put_sku(gw, "bench-replay", 1_000_000_000)
        put_sku(gw, "bench-soldout", 1)
        assert settled(gw, "bench-soldout", "first") == 202
        assert settled(gw, "bench-soldout", "second") == 409  # learnt
        lines = []
        for i in range(self.args.replay_keys):
            user, key = f"r{i}", str(uuid.uuid4())
            assert settled(gw, "bench-replay", user, key) == 202
            lines.append(f"{user} {key}")
        self.pairs.write_text("\n".join(lines) + "\n")
        self.redis.set("naive:{bench-naive}:stock", 1_000_000_000)

    def port_of(self, sc: Scenario) -> int:
        return self.stack.ports[sc.server]

    def server_pid(self, sc: Scenario) -> int | None:
        proc = self.stack.procs.get(sc.server)
        return proc.pid if proc is not None else None

    @contextlib.contextmanager
    def mode(self, sc: Scenario) -> Iterator[None]:
        """QUEUE_ONLY for the scenario's run (the mode is shared by every gateway)."""
        if sc.queue_only:
            switch(self.stack.ports["gateway"], "QUEUE_ONLY")
            time.sleep(0.6)  # every worker follows within the refresh interval
        try:
            yield
        finally:
            if sc.queue_only:
                switch(self.stack.ports["gateway"], "NORMAL")
                time.sleep(0.6)

    def wrk(self, sc: Scenario, seconds: float, connections: int = 256) -> dict[str, Any]:
        env = {
            **os.environ,
            "BENCH_SKU": sc.sku,
            "BENCH_PROMO": PROMO,
            "BENCH_KIND": sc.kind,
            "BENCH_PAIRS": str(self.pairs),
            "BENCH_RUN": next(self.run_ids),
        }
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(HERE / "wrk/order.lua"),
            f"http://127.0.0.1:{self.port_of(sc)}{ORDER}",
        ]
        out = subprocess.run(
            pinned(self.stack.load_cpu, argv), env=env, capture_output=True, text=True, check=True
        ).stdout
        line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
        result: dict[str, Any] = json.loads(line)
        result["rps"] = round(result["requests"] / result["seconds"], 1)
        return result

    def closed_max(self, sc: Scenario, seconds: float, connections: int) -> dict[str, Any]:
        evalsha = self.evalsha_calls()
        if sc.server == "direct":
            argv = [
                sys.executable,
                "-m",
                "bench.direct",
                "closed",
                "--url",
                self.stack.redis_url,
                "--duration",
                str(seconds),
                "--concurrency",
                str(connections),
            ]
            out = subprocess.run(
                pinned(self.stack.server_cpu, argv),
                capture_output=True,
                text=True,
                check=True,
                cwd=HERE.parent,
            ).stdout
            result: dict[str, Any] = json.loads(out)
            result["rps_per_cpu_s"] = round(result["requests"] / result["cpu_seconds"], 1)
        else:
            pid = self.server_pid(sc)
            assert pid is not None
            cpu0 = cpu_seconds(pid)
            with self.mode(sc):
                result = self.wrk(sc, seconds, connections)
            cpu = cpu_seconds(pid) - cpu0
            result["cpu_seconds"] = round(cpu, 3)
            result["rps_per_cpu_s"] = round(result["requests"] / cpu, 1) if cpu else None
        result["evalsha_per_request"] = round(
            (self.evalsha_calls() - evalsha) / max(1, result["requests"]), 3
        )
        return result

    def open_loop(self, sc: Scenario, rate: float, seconds: float) -> dict[str, Any]:
        if sc.server == "direct":
            argv = [
                sys.executable,
                "-m",
                "bench.direct",
                "open",
                "--url",
                self.stack.redis_url,
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
            ]
            cpu = self.stack.server_cpu
        else:
            argv = [
                sys.executable,
                "-m",
                "bench.openloop",
                "--port",
                str(self.port_of(sc)),
                "--rate",
                str(rate),
                "--duration",
                str(seconds),
                "--sku",
                sc.sku,
                "--promo",
                PROMO,
                "--kind",
                sc.kind,
                "--pairs",
                str(self.pairs),
            ]
            cpu = self.stack.load_cpu
        with self.mode(sc):
            out = subprocess.run(
                pinned(cpu, argv), capture_output=True, text=True, check=True, cwd=HERE.parent
            ).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def evalsha_calls(self) -> int:
        stats: dict[str, Any] = self.redis.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    def profile(self, sc: Scenario, seconds: float, connections: int) -> dict[str, Any]:
        """Where the server process spends its CPU under a closed-loop wrk run: py-spy samples
        grouped by the file of the innermost frame (the code that was running)."""
        pid = self.server_pid(sc)
        spy = shutil.which("py-spy")
        if pid is None or spy is None:
            return {"skipped": "py-spy is not installed (pip install '.[bench]')"}
        raw = self.stack.work / f"profile-{sc.name}.txt"
        with self.mode(sc):
            load = threading.Thread(target=self.wrk, args=(sc, seconds + 2, connections))
            load.start()
            time.sleep(1)
            subprocess.run(
                [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f",
                 "raw", "-o", str(raw), "--nonblocking"],
                capture_output=True, check=True,
            )  # fmt: skip
            load.join()
        shares: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            shares[_component(leaf)] += int(count)
            leaves[leaf.split(" (", 1)[0] + " (" + _where(leaf) + ")"] += int(count)
            total += int(count)
        return {
            "samples": total,
            "share_by_component": {k: round(v / total, 3) for k, v in shares.most_common()},
            "top_functions": {k: round(v / total, 3) for k, v in leaves.most_common(15)},
        }

    def round_trips(self, requests: int) -> dict[str, float]:
        """Commands sent to Redis per request, counted on the wire by a proxy in front of a
        second gateway (its first sold-out answer, learning the SKU, included)."""
        assert self.stack.proxy is not None
        out: dict[str, float] = {}
        for sc in scenarios():
            if sc.server != "gateway":
                continue
            counted = Scenario(sc.name, sc.title, "counted", sc.sku, sc.kind, sc.queue_only)
            before = self.stack.proxy.commands
            result = self.open_loop(counted, rate=1000.0, seconds=requests / 1000)
            sent = self.stack.proxy.commands - before
            out[sc.name] = round(sent / max(1, int(result["answered"])), 4)
        return out

    def memory_per_order(self, orders: int) -> dict[str, Any]:
        """Redis memory of held orders: every key an accepted order adds, stream entry and
        idempotency record included, over a batch on a fresh SKU."""
        gw = self.stack.ports["gateway"]
        put_sku(gw, "bench-memory", 1_000_000_000)
        self.redis.memory_purge()
        before = int(self.redis.info("memory")["used_memory"])
        sc = Scenario("memory", "memory", "gateway", sku="bench-memory")
        result = self.open_loop(
            sc, rate=min(4000.0, orders / 2), seconds=orders / min(4000.0, orders / 2)
        )
        held = int(self.redis.hget("fg:{bench-memory}:sku", "held") or 0)
        self.redis.memory_purge()
        after = int(self.redis.info("memory")["used_memory"])
        return {
            "orders_held": held,
            "answers": result["statuses"],
            "bytes_per_order": round((after - before) / max(1, held), 1),
            "breakdown_bytes_per_order": self.memory_breakdown("bench-memory", held),
        }

    def memory_breakdown(self, sku: str, held: int, sample: int = 200) -> dict[str, float]:
        """MEMORY USAGE per order of each structure an accepted order adds to (per-order keys
        averaged over a sample; per-SKU structures divided by the orders held). The rest of
        `bytes_per_order` is the keyspace's own cost: dict entries, expiry entries, rounding."""
        tag = "{" + sku + "}"
        per_key = {"order record": f"fg:{tag}:o:*", "idempotency record": f"fg:{tag}:idem:*"}
        out: dict[str, float] = {}
        for name, pattern in per_key.items():
            sizes = []
            for key in self.redis.scan_iter(match=pattern, count=1000):
                sizes.append(int(self.redis.memory_usage(key, samples=0) or 0))
                if len(sizes) >= sample:
                    break
            out[name] = round(statistics.mean(sizes), 1) if sizes else 0.0
        guards = []
        for key in self.redis.scan_iter(match="fg:{u:b*}:ik:*", count=1000):
            guards.append(int(self.redis.memory_usage(key, samples=0) or 0))
            if len(guards) >= sample:
                break
        out["idempotency guard (user slot)"] = round(statistics.mean(guards), 1) if guards else 0.0
        for name in ("stream", "holds", "accepted", "users"):
            total = int(self.redis.memory_usage(f"fg:{tag}:{name}", samples=0) or 0)
            out[f"{name} (per order)"] = round(total / max(1, held), 1)
        return out

    def oversell(self, stock: int, seconds: float) -> dict[str, Any]:
        """The naive design and flashgate, one small stock each, the same wrk load."""
        gw = self.stack.ports["gateway"]
        self.redis.set("naive:{bench-race}:stock", stock)
        put_sku(gw, "bench-race", stock)
        out: dict[str, Any] = {"stock": stock}
        naive = Scenario("naive-race", "naive", "naive", sku="bench-race")
        fg = Scenario("flashgate-race", "flashgate", "gateway", sku="bench-race")
        self.wrk(naive, seconds)
        accepted = int(self.redis.llen("naive:{bench-race}:orders"))
        out["naive"] = {
            "accepted": accepted,
            "oversold": max(0, accepted - stock),
            "stock_left": int(self.redis.get("naive:{bench-race}:stock") or 0),
        }
        self.wrk(fg, seconds)
        raw: dict[Any, Any] = self.redis.hgetall("fg:{bench-race}:sku")
        sku = {k: int(v) for k, v in raw.items() if k in ("stock", "available", "held", "sold")}
        out["flashgate"] = {
            "accepted": sku["held"] + sku["sold"],
            "oversold": max(0, sku["held"] + sku["sold"] - stock),
            "stock_left": sku["available"],
            "invariant": sku["stock"] == sku["available"] + sku["held"] + sku["sold"],
        }
        return out


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is needed for the closed-loop maximums (apt install wrk)")
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = cpus[0], cpus[-1]
    with tempfile.TemporaryDirectory(prefix="flashgate-bench-") as tmp:
        stack = Stack(Path(tmp), server_cpu, load_cpu, args.workers)
        try:
            stack.start()
            bench = Bench(stack, args)
            scs = [sc for sc in scenarios() if not args.only or sc.name in args.only]
            measure_maxima(bench, scs, args)
            if "latency" in args.phases:
                measure_latency(bench, scs, args)
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
        "method": {
            "server_cpu": server_cpu,
            "gateway_workers": args.workers,
            "load_and_redis_cpu": load_cpu,
            "rounds": args.rounds,
            "connections": args.connections,
            "seconds_per_max_run": args.seconds,
            "seconds_per_latency_run": args.latency_seconds,
            "latency": "median run of `rounds` by p99, rounds interleaved",
            "wrk": "wrk -t1 -c<connections>, closed loop",
            "open_loop": "bench.openloop, 256 connections, latency from the intended start",
        },
        "headline": headline(rows),
        "scenarios": rows,
        "round_trips_per_request": trips,
        "profiles": profiles,
        "memory": memory,
        "server_log_fsync_and_rewrite": warnings[-20:],
        "oversell": race,
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


def _where(frame: str) -> str:
    """`file.py:line` of a py-spy frame, the path cut to its package."""
    where = frame.rpartition("(")[2].rstrip(")")
    for marker in ("site-packages/", "/work/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return where.rsplit("/", 2)[-2] + "/" + where.rsplit("/", 1)[-1] if "/" in where else where


def _component(frame: str) -> str:
    """The part of the stack a py-spy frame (`function (path:line)`) belongs to."""
    where = frame.rpartition("(")[2]
    for part, name in (
        ("gateway/transport/", "flashgate: Redis client"),
        ("gateway/", "flashgate: handler, checks, scripts' arguments"),
        ("uvicorn/", "uvicorn: HTTP parsing and writing"),
        ("starlette/", "starlette: response objects"),
        ("msgspec", "msgspec"),
        ("asyncio/", "asyncio and uvloop: the event loop"),
        ("bench/", "bench app"),
    ):
        if part in where:
            return name
    return "other (the event loop in C, interpreter)"


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


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
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
