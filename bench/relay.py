"""How fast one relay hands events over: events per second confirmed by a real webhook
receiver and by a real RabbitMQ broker, and the relay's CPU seconds for them.

    python -m bench.relay                     # its own Valkey, receiver and RabbitMQ node
    python -m bench.relay --events 5000 --skus 1 16 --amqp amqp://guest:guest@host:5672/

For each target and each SKU count: `--events` well-formed final events (as `finalize.lua`
writes them) are put in the SKUs' events streams before the relay starts, then one relay
(in this process, uvloop) runs until its target confirmed them all. The receiver (the tests'
`Receiver`: uvicorn, Standard Webhooks verification) runs in a process of its own, as does the
broker; the relay reads `FLASHGATE_RELAY_PREFETCH` = 200 entries per batch. Within a stream
events go one after the other (commit order), up to 16 streams at once: one SKU measures the
per-event round trip, many SKUs the relay's own ceiling. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import resource
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from importlib.metadata import version
from typing import Any

import uvloop

from gateway.ops.embedded import free_port, server_binary, wait_for_ping
from gateway.schemas import SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.relay.factory import target_for
from gateway.workers.relay.loop import Relay

SECRET = "whsec_" + base64.b64encode(b"bench-relay-secret-of-32-bytes!!").decode()
PREFETCH = 200


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def fill(settings: Settings, events: int, skus: int) -> None:
    """`events` CONFIRMED events spread over `skus` SKUs' events streams."""
    redis = create_client(settings)
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    inventory = Inventory(redis, scripts, settings)
    await redis.flushall()
    now = int(time.time() * 1000)
    for s in range(skus):
        sku = f"bench-{s}"
        await inventory.configure_sku(
            sku, SkuConfig(promotion_id="p", stock=events, per_user_limit=1)
        )
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(s, events, skus):
                history = [{"from": None, "to": "HELD", "at": now}, {"from": "HELD", "to": "CONFIRMED", "at": now + 1}]  # fmt: skip  # noqa: E501
                pipe.xadd(keys.SkuKeys(sku).events, {
                    "event": "CONFIRMED", "order_id": f"{uuid.uuid4().hex[:16]}.{sku}",
                    "status": "CONFIRMED", "user_id": f"u{i}", "sku_id": sku,
                    "promotion_id": "p", "quantity": "1", "created_at": str(now),
                    "at": str(now + 1), "history": json.dumps(history),
                    "payment_id": f"pay-{i}",
                })  # fmt: skip
            await pipe.execute()
    await redis.aclose()


async def relay_once(settings: Settings, events: int) -> dict[str, Any]:
    """One relay until `events` are confirmed: seconds, events/s, CPU seconds."""
    redis = create_client(settings)
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    relay = Relay(redis, scripts, settings, target_for(settings))
    began, cpu = time.perf_counter(), cpu_s()
    running = asyncio.create_task(relay.run())
    while relay.delivered < events:
        if running.done():
            running.result()  # raises why the relay stopped
        await asyncio.sleep(0.005)
    seconds, cpu = time.perf_counter() - began, cpu_s() - cpu
    relay.stop()
    await running
    await redis.aclose()
    return {
        "events": relay.delivered,
        "seconds": round(seconds, 2),
        "events_per_s": round(relay.delivered / seconds),
        "relay_cpu_s": round(cpu, 2),
        "cpu_ms_per_event": round(cpu * 1000 / relay.delivered, 3),
        "retries": relay.retries,
    }


async def delete_queue(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead"):
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{queue}.dead")


def serve_receiver(port: int) -> None:
    """The tests' webhook receiver alone in this process, until killed."""
    from tests.support.receiver import Receiver

    async def forever() -> None:
        receiver = Receiver(SECRET, port=port)
        await receiver.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(forever())


def start_receiver(stack: ExitStack) -> str:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.relay", "--serve-receiver", str(port)],
        stdout=subprocess.PIPE,
    )
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return f"http://127.0.0.1:{port}/hook"


def start_valkey(stack: ExitStack) -> str:
    port = free_port()
    proc = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_ping(url, 10, proc)
    return url


def start_broker(stack: ExitStack) -> str:
    from tests.support.rabbitmq import rabbit_broker

    return stack.enter_context(rabbit_broker()).url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--skus", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--targets", nargs="+", default=["webhook", "rabbitmq"])
    parser.add_argument("--amqp", help="an existing broker (default: start one)")
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return
    print(json.dumps({
        "python": platform.python_version(), "machine": platform.machine(),
        "redis-py": version("redis"), "aio-pika": version("aio-pika"),
        "aiohttp": version("aiohttp"),
        "server": server_binary(),
    }))  # fmt: skip
    with ExitStack() as stack:
        redis_url = start_valkey(stack)
        for target in args.targets:
            if target == "webhook":
                url = start_receiver(stack)
            else:
                url = args.amqp or start_broker(stack)
            for skus in args.skus:
                queue = f"bench-{uuid.uuid4().hex[:8]}"
                settings = Settings(
                    redis_url=redis_url, relay_url=url, relay_secret=SECRET,
                    relay_queue=queue, relay_prefetch=PREFETCH, queue_max=max(args.events, 1000),
                )  # fmt: skip
                uvloop.run(fill(settings, args.events, skus))
                out = uvloop.run(relay_once(settings, args.events))
                if target == "rabbitmq":
                    uvloop.run(delete_queue(url, queue))
                print(json.dumps({"target": target, "skus": skus, **out}), flush=True)


if __name__ == "__main__":
    main()
