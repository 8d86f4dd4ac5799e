"""How the store's cost grows with live holds: a million holds on one SKU in the embedded
server, then what one order costs in Redis with them there, what the sweeper costs to find
nothing due and to release them, and the memory each hold takes.

    python -m bench.scale --holds 1000000      # about 2 minutes; --holds 100000 for a quick look

Orders go in through create_order.lua (the order path's script and builder), many calls per
write on the multiplexed client; the holds are made with a `now_ms` one hold TTL in the past,
so all of them are due for the sweep at the end. Prints one JSON object and writes it to
`bench/results/scale.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop

from gateway.ops.embedded import EmbeddedServer
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.outcomes import CreateResult, Swept
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed

SKU = "scale"
BATCH = 5000  # script calls per write


async def evalsha_us(mux: Multiplexed) -> tuple[int, float]:
    """(calls, microseconds) of EVALSHA so far, from INFO commandstats."""
    info = (await mux.execute_command("INFO", "commandstats")).decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(f.split("=") for f in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), float(fields["usec"])
    return 0, 0.0


async def orders(
    mux: Multiplexed, scripts: ScriptRegistry, settings: Settings, first: int, n: int, now_ms: int
) -> float:
    """`n` new orders of one unit each (users `first`...), in writes of BATCH calls; returns
    the server's EVALSHA microseconds per order over them."""
    script = scripts["create_order"]
    sk = keys.SkuKeys(SKU)
    calls0, us0 = await evalsha_us(mux)
    for start in range(first, first + n, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, first + n)):
            user, key = f"u{i}", str(uuid.uuid4())
            ks, args = calls.create_order(
                sk, key, True, keys.new_order_id(SKU), user, SKU, 1, "p", f"{SKU}|1|p",
                settings.hold_ttl_s * 1000, settings.idempotency_ttl_s * 1000, now_ms, "hold",
                10**12, f"{key}:{user}", "", False, 1, False,
            )  # fmt: skip
            batch.append(("EVALSHA", script.sha, len(ks), *ks, *args))
        for reply in await mux.execute_many(batch):
            assert not isinstance(reply, Exception) and reply[0] == CreateResult.CREATED, reply
    calls1, us1 = await evalsha_us(mux)
    return (us1 - us0) / max(1, calls1 - calls0)


async def sweep(mux: Multiplexed, scripts: ScriptRegistry, batch: int, now_ms: int) -> Swept:
    sk = keys.SkuKeys(SKU)
    ks, args = calls.sweep(sk, now_ms=now_ms, batch=batch, orders_prefix=sk.orders_prefix, skip=0)
    return Swept.of(await scripts["sweep"](mux, ks, args))


async def used_memory(mux: Multiplexed) -> int:
    await mux.execute_command("MEMORY", "PURGE")
    info = (await mux.execute_command("INFO", "memory")).decode()
    return int(next(ln for ln in info.splitlines() if ln.startswith("used_memory:")).split(":")[1])


async def run(url: str, holds: int, sweep_batch: int) -> dict[str, Any]:
    settings = Settings(redis_url=url, admin_token="t")
    client = create_client(settings)
    mux = Multiplexed(url, timeout_s=60.0)
    scripts = ScriptRegistry()
    await scripts.load_all(client)
    ks, args = calls.configure_sku(
        keys.SkuKeys(SKU), promotion_id="p", stock=10**12, per_user_limit=1, starts_at=None,
        ends_at=None, by="bench", client="", changes_kept=10, stock_mode="set", buckets=1,
        total_stock=None, log_change=False, prequeue_s=0, draw_seed="", draw_commitment="",
    )  # fmt: skip
    await scripts["configure_sku"](mux, ks, args)
    await mux.execute_command("SADD", keys.SKU_REGISTRY, SKU)
    now_ms = int(time.time() * 1000)
    past = now_ms - settings.hold_ttl_s * 1000 - 1000  # every hold made is due at `now_ms`
    memory0 = await used_memory(mux)
    started = time.monotonic()
    first_us = await orders(mux, scripts, settings, 0, 10_000, past)
    await orders(mux, scripts, settings, 10_000, holds - 20_000, past)
    last_us = await orders(mux, scripts, settings, holds - 10_000, 10_000, past)
    filled_s = time.monotonic() - started
    per_hold = (await used_memory(mux) - memory0) / holds
    # nothing due yet (a deadline before every hold's): the sweeper's look at a full index
    t = time.perf_counter()
    idle = await sweep(mux, scripts, sweep_batch, past)
    idle_ms = (time.perf_counter() - t) * 1000
    calls0, us0 = await evalsha_us(mux)
    released, batches, t = 0, 0, time.perf_counter()
    while True:
        swept = await sweep(mux, scripts, sweep_batch, now_ms)
        released += swept.released
        batches += 1
        if swept.selected < sweep_batch:
            break
    took = time.perf_counter() - t
    calls1, us1 = await evalsha_us(mux)
    await mux.aclose()
    await client.aclose()
    return {
        "holds": holds,
        "fill_seconds": round(filled_s, 1),
        "create_order_us_in_redis_first_10k": round(first_us, 2),
        "create_order_us_in_redis_last_10k": round(last_us, 2),
        "memory_bytes_per_hold": round(per_hold, 1),
        "sweep_nothing_due_ms": round(idle_ms, 3),
        "sweep_nothing_due_released": idle.released,
        "sweep_batch": sweep_batch,
        "sweep_released": released,
        "sweep_seconds": round(took, 2),
        "sweep_us_per_hold_in_redis": round((us1 - us0) / max(1, released), 2),
        "sweep_ms_per_batch_in_redis": round((us1 - us0) / max(1, calls1 - calls0) / 1000, 3),
    }


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedServer(d, persist=False)
        server.start()
        try:
            result = await run(server.url, args.holds, args.sweep_batch)
        finally:
            server.stop()
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--holds", type=int, default=1_000_000)
    p.add_argument("--sweep-batch", type=int, default=Settings().sweep_batch)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = p.parse_args()
    if args.holds < 20_000:  # the first and the last 10,000 orders are measured apart
        p.error("--holds must be at least 20000")
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
