"""The ceiling of the store: the hold script called directly, without HTTP, on the gateway's
own client path (`Inventory.create_order` over the multiplexed connection).

    python -m bench.direct closed --duration 5 --concurrency 64
    python -m bench.direct open --rate 20000 --duration 5

Prints one JSON object like `bench.openloop` (closed: achieved rate; open: latency percentiles
from each call's intended start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter

import uvloop

from bench.openloop import clock, percentiles
from gateway.schemas import OrderRequest
from gateway.settings import Settings
from gateway.store.inventory import Inventory
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed

SKU = "bench-direct"


class Driver:
    def __init__(self, url: str) -> None:
        # no backlog bound here: nothing drains the stream while the bench runs
        settings = Settings(redis_url=url, redis_timeout_ms=5000, queue_max=1_000_000_000)
        self.redis = create_client(settings)
        self.fast = Multiplexed(url, timeout_s=5.0)
        self.inv = Inventory(self.redis, ScriptRegistry(), settings, fast=self.fast)
        self.run = uuid.uuid4().hex[:8]
        self.n = 0
        self.results: Counter[str] = Counter()

    async def one(self) -> None:
        self.n += 1
        req = OrderRequest(
            user_id=f"d{self.run}{self.n}", sku_id=SKU, quantity=1, promotion_id="bench"
        )
        result, _ = await self.inv.create_order(req, f"{self.run}-0000-4000-8000-{self.n:012x}")
        self.results[result.name] += 1

    async def close(self) -> None:
        await self.fast.aclose()
        await self.redis.aclose()


async def closed(url: str, duration: float, concurrency: int) -> dict[str, object]:
    d = Driver(url)
    await d.inv.scripts.load_all(d.redis)
    stop = time.monotonic() + duration
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await d.one()
            done += 1

    c0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    c1, t1 = time.process_time(), time.monotonic()
    await d.close()
    return {
        "requests": done,
        "seconds": round(t1 - t0, 3),
        "rps": round(done / (t1 - t0), 1),
        "cpu_seconds": round(c1 - c0, 3),
        "results": dict(d.results),
    }


async def open_loop(url: str, rate: float, duration: float) -> dict[str, object]:
    d = Driver(url)
    await d.inv.scripts.load_all(d.redis)
    await d.one()  # connected before the clock starts
    latencies: list[float] = []
    lags: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async def timed(intended: float) -> None:
        lags.append(clock() - intended)
        await d.one()
        latencies.append(clock() - intended)

    total = int(rate * duration)
    t0 = clock() + 0.01
    sent = 0
    while sent < total:
        due = min(total, int((clock() - t0) * rate) + 1)
        while sent < due:
            task = asyncio.create_task(timed(t0 + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.0002)
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    elapsed = clock() - t0
    await d.close()
    return {
        "offered_rps": rate,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "sent": total,
        "answered": len(latencies),
        "statuses": dict(d.results),
        "latency_ms": percentiles(latencies),
        "generator_lag_ms": percentiles(lags),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("how", choices=["closed", "open"])
    p.add_argument("--url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float)
    a = p.parse_args(argv)
    if not a.url:
        p.error("--url or REDIS_URL is needed")
    if a.how == "closed":
        result = uvloop.run(closed(a.url, a.duration, a.concurrency))
    else:
        if a.rate is None:
            p.error("open needs --rate")
        result = uvloop.run(open_loop(a.url, a.rate, a.duration))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
