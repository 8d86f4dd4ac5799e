"""The cost of the Redis client path, measured first (issue #5): CPU per command of redis-py's
asyncio connection pool against the multiplexed connection the order path uses, on one event
loop, with many concurrent callers running the same small script.

    python -m bench.client_path            # starts its own embedded server

Prints CPU microseconds per command and commands per second for each, alternating A B A B.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from gateway.ops.embedded import EmbeddedServer
from gateway.settings import Settings
from gateway.transport.connect import create_client
from gateway.transport.wire import Multiplexed

SCRIPT = "return redis.call('INCR', KEYS[1])"


async def drive(client: Any, commands: int, callers: int) -> tuple[float, float]:
    """(CPU µs per command, commands per second) with `callers` concurrent tasks."""
    sha = await client.execute_command("SCRIPT", "LOAD", SCRIPT)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    each = commands // callers

    async def caller() -> None:
        for _ in range(each):
            await client.execute_command("EVALSHA", sha, 1, "bench:counter")

    await asyncio.gather(*(caller() for _ in range(8)))  # warm-up
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    cpu1, t1 = time.process_time(), time.perf_counter()
    done = each * callers
    return (cpu1 - cpu0) / done * 1e6, done / (t1 - t0)


async def compare(url: str, commands: int, callers: int, rounds: int) -> None:
    settings = Settings(redis_url=url, redis_max_connections=callers)
    for _ in range(rounds):
        for kind in ("pool", "mux"):
            client: Any = (
                create_client(settings) if kind == "pool" else Multiplexed(url, timeout_s=5.0)
            )
            cpu_us, rate = await drive(client, commands, callers)
            await client.aclose()
            print(f"{kind:>4}: {cpu_us:6.1f} µs CPU per command, {rate:9,.0f} commands/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a Redis URL (default: start an embedded server)")
    p.add_argument("--commands", type=int, default=20_000)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = None if a.url else EmbeddedServer(Path(tmp) / "valkey", persist=False)
        url = a.url or server.start()  # type: ignore[union-attr]
        try:
            uvloop.run(compare(url, a.commands, a.callers, a.rounds))
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
