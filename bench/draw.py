"""What a fair start's draw costs: N pre-queued orders drawn by one drawer, on a fresh server.

    python -m bench.draw                      # 10,000 and 100,000 orders, about a minute
    python -m bench.draw --orders 20000 --batch 200

For each size: the time to pre-queue the orders (concurrent intake through the store), and the
draw's time split into opening, reading and ranking the pre-queue (HMAC-SHA256 in Python) and
deciding it in rank order (`draw_decide.lua` batches). JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
import uuid
from typing import Any

import redis

from gateway.ops.embedded import free_port, server_binary, wait_for_ping
from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import draws
from gateway.store.inventory import Inventory
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.draw import Drawer

CONCURRENCY = 200  # intake requests in flight while pre-queueing


async def measure(url: str, orders: int, batch: int) -> dict[str, Any]:
    settings = Settings(redis_url=url, draw_batch=batch, queue_max=10 * orders)
    client = create_client(settings)
    await client.flushall()
    scripts = ScriptRegistry()
    await scripts.load_all(client)
    inv = Inventory(client, scripts, settings)
    start = int(time.time()) + 3600
    cfg = dict(promotion_id="p", stock=orders // 10, per_user_limit=1, prequeue_s=7200)
    await inv.configure_sku("s", SkuConfig(starts_at=start, **cfg))  # type: ignore[arg-type]

    async def one(i: int) -> None:
        req = OrderRequest(user_id=f"u{i}", sku_id="s", quantity=1, promotion_id="p")
        await inv.create_order(req, str(uuid.uuid4()))

    t = time.perf_counter()
    for low in range(0, orders, CONCURRENCY):
        await asyncio.gather(*(one(i) for i in range(low, min(orders, low + CONCURRENCY))))
    prequeue_s = time.perf_counter() - t
    started = int(time.time()) - 1
    await inv.configure_sku("s", SkuConfig(starts_at=started, **cfg))  # type: ignore[arg-type]

    t = time.perf_counter()
    opened = await inv.draws.open("s")
    ids = await inv.draws.prequeued("s")
    ranked = draws.ranked(opened.seed, ids)
    rank_s = time.perf_counter() - t
    assert len(ranked) == orders
    drawer = Drawer(inv.draws, settings)
    t = time.perf_counter()
    await drawer.draw("s")
    total_s = rank_s + (time.perf_counter() - t)  # the drawer opens and ranks again: once more
    view = await inv.draws.view("s")
    assert view is not None and draws.problems(view, prequeued=ids) == []
    await client.aclose()
    return {
        "orders": orders,
        "batch": batch,
        "prequeue_s": round(prequeue_s, 2),
        "prequeue_per_s": round(orders / prequeue_s),
        "open_read_rank_s": round(rank_s, 3),
        "draw_total_s": round(total_s, 3),
        "decided_per_s": round(orders / (total_s - rank_s)) if total_s > rank_s else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, action="append", help="pre-queued orders")
    parser.add_argument("--batch", type=int, default=100, help="orders per draw_decide call")
    args = parser.parse_args()
    print(json.dumps({"python": platform.python_version(), "redis-py": redis.__version__}))
    port = free_port()
    proc = subprocess.Popen(
        [server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_ping(url, 10, proc)
        for n in args.orders or [10_000, 100_000]:
            print(json.dumps(asyncio.run(measure(url, n, args.batch))), flush=True)
    finally:
        proc.terminate()
        proc.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
