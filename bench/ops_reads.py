"""How the ops reads grow with SKUs: `/metrics`, the console's view, a `flashgate status`
table and `flashgate audit` at `--skus` configured SKUs, and what a reading does to the orders
served meanwhile.

    python -m bench.ops_reads --skus 10000        # about a minute

Starts the embedded server (pinned to the last core) and one gateway worker (`flashgate
gateway`, pinned to the first), configures the SKUs through configure_sku.lua, then takes
`--readings` cold readings of each (each after the figures' age has passed, so each reads
Redis): wall time, the gateway's CPU time and the server's script time (INFO commandstats).
Meanwhile one shopper (a process of its own) sends orders one after the other on a
kept-alive connection; its latencies during the readings are reported beside those of a quiet
stretch before them. Prints one
JSON object and writes it to `bench/results/ops_reads.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench.stack import ADMIN_TOKEN, ORDER, PROMO, cpu_seconds, pinned, put_sku, wait_port
from gateway.ops import status
from gateway.ops.embedded import EmbeddedServer, free_port
from gateway.store import calls, keys
from gateway.store.figures import PER_CALL, Sampler
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed

HERE = Path(__file__).resolve().parent
MAX_AGE_MS = 200  # the figures' age in this run: a reading this long after the last is cold


def configure(url: str, skus: int) -> None:
    """`skus` SKUs through configure_sku.lua (stock 1,000 + i each) and the registry."""
    client = redis_sync.Redis.from_url(url)
    sha = client.script_load(ScriptRegistry()["configure_sku"].source)
    pipe = client.pipeline(transaction=False)
    pipe.sadd(keys.SKU_REGISTRY, *(f"s{i}" for i in range(skus)))
    for i in range(skus):
        ks, args = calls.configure_sku(
            keys.SkuKeys(f"s{i}"), promotion_id=PROMO, stock=1000 + i, per_user_limit=5,
            starts_at=None, ends_at=None, by="bench", client="", changes_kept=10,
            stock_mode="set", buckets=1, total_stock=None, log_change=False, prequeue_s=0,
            draw_seed="", draw_commitment="",
        )  # fmt: skip
        pipe.evalsha(sha, len(ks), *ks, *args)
    pipe.execute()
    client.close()


def script_ms(client: redis_sync.Redis) -> float:
    """Milliseconds the server spent in EVALSHA so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0)) / 1000


def shop(port: int, sku: str, seconds: float, out: Connection) -> None:
    """Orders one after the other on one kept-alive connection for `seconds`, in a process
    of its own (the readings' client must not hold its interpreter); sends back each
    latency with the (monotonic) time it started."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[tuple[float, float]] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        body = json.dumps({"user_id": f"u{n}", "sku_id": sku, "quantity": 1, "promotion_id": PROMO})
        started = time.monotonic()
        conn.request("POST", ORDER, body, {"X-Idempotency-Key": str(uuid.uuid4())})
        conn.getresponse().read()
        latencies.append((started, (time.monotonic() - started) * 1000))
        time.sleep(0.002)
    out.send(latencies)


def between(latencies: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [ms for at, ms in latencies if start <= at < end]


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    resp = conn.getresponse()
    size = len(resp.read())
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status}")
    conn.close()
    return size


def readings(
    read: Callable[[], object], n: int, pid: int | None, client: redis_sync.Redis
) -> dict[str, Any]:
    """`n` cold readings: wall ms, the gateway's CPU ms, the server's script ms, each."""
    wall, cpu, redis_ms = [], [], []
    for _ in range(n):
        time.sleep(MAX_AGE_MS / 1000 + 0.3)
        c0, r0, t0 = cpu_seconds(pid) if pid else 0.0, script_ms(client), time.perf_counter()
        read()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append(((cpu_seconds(pid) if pid else 0.0) - c0) * 1000)
        redis_ms.append(script_ms(client) - r0)
    return {
        "wall_ms": sorted(round(x, 1) for x in wall),
        "wall_ms_median": round(statistics.median(wall), 1),
        "gateway_cpu_ms": sorted(round(x) for x in cpu) if pid else None,
        "redis_script_ms": sorted(round(x, 1) for x in redis_ms),
    }


def status_reading(url: str) -> Callable[[], object]:
    """One reading of `flashgate status`'s table: its pass (with the events streams' counts)
    and the table's text, as `flashgate status` makes them."""
    reader = Multiplexed(url, timeout_s=60.0)
    sampler = Sampler(reader, ScriptRegistry(), max_age_s=0, per_call=PER_CALL)
    loop = asyncio.new_event_loop()
    before = loop.run_until_complete(sampler.sample(streams=2))

    def read() -> object:
        return status.render(before, loop.run_until_complete(sampler.sample(streams=2)))

    return read


def status_process(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gateway", "status"],
        env={**os.environ, "REDIS_URL": url},
        check=True,
        capture_output=True,
    )


def audit(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gateway", "audit"],
        env={**os.environ, "REDIS_URL": url},
        check=True,
        capture_output=True,
    )


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    ms = sorted(ms)
    return {
        "orders": len(ms),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
    }


def measure(
    args: argparse.Namespace, port: int, url: str, client: redis_sync.Redis, pid: int
) -> dict[str, Any]:
    """The readings against a started gateway: /metrics, the console, the status and the
    audit, with the orders of a shopper beside them, quiet and during the readings."""
    started = time.monotonic()
    configure(url, args.skus)
    put_sku(port, "shop", 10**9, per_user_limit=10**9)
    configured_s = time.monotonic() - started
    receiving, sending = multiprocessing.Pipe(duplex=False)
    shopping_s = 5.0 + 2 * args.readings * (MAX_AGE_MS / 1000 + 0.6)
    shopper = multiprocessing.Process(
        target=shop, args=(port, "shop", shopping_s, sending), daemon=True
    )
    shopper.start()
    time.sleep(1.0)
    quiet_from = time.monotonic()
    time.sleep(3.0)
    quiet_to = busy_from = time.monotonic()
    result: dict[str, Any] = {
        "skus": args.skus,
        "configure_s": round(configured_s, 1),
        "metrics_bytes": get(port, "/metrics"),
        "metrics": readings(lambda: get(port, "/metrics"), args.readings, pid, client),
        "console_bytes": get(port, "/api/v1/admin/console"),
        "console": readings(lambda: get(port, "/api/v1/admin/console"), args.readings, pid, client),
    }
    busy_to = time.monotonic()
    latencies = receiving.recv()
    shopper.join()
    result["orders_quiet"] = percentiles(between(latencies, quiet_from, quiet_to))
    result["orders_during_readings"] = percentiles(between(latencies, busy_from, busy_to))
    result["status"] = readings(status_reading(url), args.readings, None, client)
    t0 = time.perf_counter()
    status_process(url)
    result["status_process_s"] = round(time.perf_counter() - t0, 2)  # two readings 1 s apart
    t0 = time.perf_counter()
    audit(url)
    result["audit_s"] = round(time.perf_counter() - t0, 1)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "valkey", persist=False)
        url = server.start()
        assert server.proc is not None
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpus[-1]), str(server.proc.pid)],
                       check=True, capture_output=True)  # fmt: skip
        port = free_port()
        env = {
            **os.environ, "REDIS_URL": url, "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_PORT": str(port), "FLASHGATE_LOG_LEVEL": "warning",
            "FLASHGATE_FIGURES_MAX_AGE_MS": str(MAX_AGE_MS), "PYTHONPATH": str(HERE.parent),
        }  # fmt: skip
        gateway = subprocess.Popen(
            pinned(cpus[0], [sys.executable, "-m", "gateway", "gateway"]), env=env, cwd=tmp
        )
        client = redis_sync.Redis.from_url(url)
        try:
            wait_port(port)
            result = measure(args, port, url, client, gateway.pid)
        finally:
            client.close()
            gateway.terminate()
            gateway.wait(15)
            server.stop()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skus", type=int, default=10_000)
    p.add_argument("--readings", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "ops_reads.json")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
