"""The measurements: the scenarios, and the closed-loop maximums (wrk), open-loop latency,
profiles, Redis round trips and memory per order, and the oversell race over one `Stack`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis as redis_sync

from bench.stack import HERE, ORDER, PROMO, Stack, cpu_seconds, pinned, put_sku, settled, switch


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
