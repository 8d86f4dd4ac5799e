"""Scale-out figures for cluster mode: what one accepted order costs each shard (Redis
commands and server CPU), on one server and on a 3-primary cluster, for a plain SKU and for a
hot SKU split into 3 stock buckets, and the capacity that follows.

    python -m bench.cluster                # starts its own servers, about a minute
    python -m bench.cluster --orders 20000 --json bench/results/cluster.json

Orders go through the gateway's own code path (Inventory on the multiplexed clients, the
two-phase idempotency record in cluster mode) from this one process; each shard's
`INFO commandstats` and `INFO cpu` are read before and after, so the figures are the servers'
own accounting, not the client's. One shard's main thread is one core: the orders per second
one shard can carry is 1 / (its CPU seconds per order) at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import uvloop

from gateway.ops.embedded import free_port, server_binary, server_env, wait_for_ping
from gateway.ops.localcluster import LocalCluster
from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.connect import create_client, create_script_client
from gateway.transport.scripts import ScriptRegistry


def shard_stats(port: int) -> tuple[float, int, dict[str, int]]:
    """(CPU seconds of the server, commands processed, calls by command) of one node."""
    c = redis.Redis(port=port, decode_responses=True)
    try:
        cpu = c.info("cpu")
        stats = c.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        total = int(c.info("stats")["total_commands_processed"])
    finally:
        c.close()
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), total, calls


async def drive(settings: Settings, sku: str, buckets: int, orders: int, concurrency: int) -> float:
    """Configure `sku` and accept `orders` orders (distinct shoppers and keys); seconds."""
    client = create_client(settings)
    fast = create_script_client(settings)
    inv = Inventory(client, ScriptRegistry(), settings, fast=fast)
    cfg = SkuConfig(promotion_id="p", stock=orders, per_user_limit=1, buckets=buckets)
    await inv.configure_sku(sku, cfg)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(orders):
        queue.put_nowait(i)
    refused: dict[str, int] = {}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            req = OrderRequest(user_id=f"{sku}-u{i}", sku_id=sku, quantity=1, promotion_id="p")
            result, _ = await inv.create_order(req, str(uuid.uuid4()))
            if result is not CreateResult.CREATED:
                refused[result.name] = refused.get(result.name, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    if fast is not None:
        await fast.aclose()
    await client.aclose()
    if refused:
        view = await Inventory(create_client(settings), ScriptRegistry(), settings).get_sku(sku)
        raise RuntimeError(f"orders of {sku} refused: {refused}; {view}")
    return seconds


def measure(
    ports: list[int], settings: Settings, sku: str, buckets: int, orders: int, concurrency: int
) -> dict[str, Any]:
    before = {p: shard_stats(p) for p in ports}
    seconds = uvloop.run(drive(settings, sku, buckets, orders, concurrency))
    after = {p: shard_stats(p) for p in ports}
    shards = []
    for p in ports:
        cpu = after[p][0] - before[p][0]
        commands = after[p][1] - before[p][1]
        shards.append(
            {
                "port": p,
                "commands_per_order": round(commands / orders, 2),
                "scripts_per_order": round(
                    sum(after[p][2].get(k, 0) - before[p][2].get(k, 0) for k in ("evalsha", "eval"))
                    / orders,
                    2,
                ),
                "cpu_us_per_order": round(cpu / orders * 1e6, 1),
            }
        )
    busiest = max(s["cpu_us_per_order"] for s in shards)
    total_cpu = sum(s["cpu_us_per_order"] for s in shards)
    return {
        "sku": sku,
        "buckets": buckets,
        "orders": orders,
        "client_orders_per_s": round(orders / seconds),
        "shards": shards,
        "cpu_us_per_order_all_shards": round(total_cpu, 1),
        # every shard's main thread at one full core: the busiest one is the limit
        "orders_per_s_at_busiest_shard_full": round(1e6 / busiest) if busiest else None,
        "orders_per_s_all_shards_full": round(len(ports) * 1e6 / total_cpu) if total_cpu else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"orders": args.orders, "runs": []}
    with tempfile.TemporaryDirectory(prefix="flashgate-scale-") as d:
        port = free_port()
        proc = subprocess.Popen(
            [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
             "--save", "", "--appendonly", "no"],
            env=server_env("mimalloc"),  # as the cluster's nodes (LocalCluster)
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"redis://127.0.0.1:{port}/0"
            wait_for_ping(url, 10, proc)
            one = Settings(redis_url=url, redis_timeout_ms=10_000)
            run = measure([port], one, "plain", 1, args.orders, args.concurrency)
            results["runs"].append({"store": "one server", **run})
        finally:
            proc.terminate()
            proc.wait(10)
        with LocalCluster(Path(d) / "cluster", primaries=3) as cluster:
            many = Settings(redis_url=cluster.url, redis_cluster=True, redis_timeout_ms=10_000)
            for sku, buckets in (("plain", 1), ("hot", 3)):
                run = measure(
                    cluster.primary_ports, many, sku, buckets, args.orders, args.concurrency
                )
                results["runs"].append({"store": "3-primary cluster", **run})
    for run in results["runs"]:
        print(
            f"{run['store']:18} {run['sku']:6} buckets {run['buckets']}: "
            f"{run['cpu_us_per_order_all_shards']} us CPU/order over all shards, busiest shard "
            f"full at {run['orders_per_s_at_busiest_shard_full']} orders/s, all shards full at "
            f"{run['orders_per_s_all_shards_full']} orders/s (this client: "
            f"{run['client_orders_per_s']}/s)"
        )
        for s in run["shards"]:
            print(
                f"    shard :{s['port']}: {s['commands_per_order']} commands "
                f"({s['scripts_per_order']} scripts), {s['cpu_us_per_order']} us CPU per order"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
