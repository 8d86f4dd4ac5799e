"""What waiting for the disk costs: orders through the gateway's script client with and
without `WAITAOF 1 0` (FLASHGATE_WAITAOF_LOCAL=1), on servers with `appendfsync everysec` and
`always`, one after the other on this machine.

    python -m bench.durability             # starts its own servers, about 20 s

For each: the latency of one order at a time (p50, max) and the time and rate of 2,000
concurrent orders (one event-loop tick, so one WAITAOF closes the whole write: a group commit).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from gateway.ops.embedded import free_port, server_binary, wait_for_ping
from gateway.transport.durable import AckedWrites
from gateway.transport.wire import Multiplexed

SCRIPT = "redis.call('HINCRBY', KEYS[1], 'held', 1) return redis.call('XADD', KEYS[2], '*', 'o', ARGV[1])"  # noqa: E501


async def run(url: str, wait: bool, replicas: int = 0) -> dict[str, Any]:
    mux = Multiplexed(url, timeout_s=10)
    local = 0 if replicas else 1
    client: Any = AckedWrites(mux, local=local, replicas=replicas, timeout_ms=5000) if wait else mux
    sha = await mux.execute_command("SCRIPT", "LOAD", SCRIPT)

    async def order(i: int) -> None:
        await client.execute_command("EVALSHA", sha, 2, "fg:{b}:sku", "fg:{b}:stream", i)

    one = []
    for i in range(20):
        t = time.perf_counter()
        await order(i)
        one.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    await asyncio.gather(*(order(i) for i in range(2000)))
    burst = time.perf_counter() - t
    await mux.aclose()
    return {
        "one_p50_ms": round(statistics.median(one), 2),
        "one_max_ms": round(max(one), 2),
        "burst_2000_ms": round(burst * 1000, 1),
        "burst_rate": round(2000 / burst),
    }


def main() -> None:
    for fsync in ("everysec", "always"):
        with tempfile.TemporaryDirectory(prefix="flashgate-durability-") as d:
            port = free_port()
            proc = subprocess.Popen(
                [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                 "--save", "", "--appendonly", "yes", "--appendfsync", fsync],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            url = f"redis://127.0.0.1:{port}/0"
            try:
                wait_for_ping(url, 10, proc)
                for wait in (False, True):
                    out = uvloop.run(run(url, wait))
                    label = f"appendfsync {fsync:8} WAITAOF {'1 0' if wait else 'off'}"
                    print(label, out, file=sys.stdout)
            finally:
                proc.terminate()
                proc.wait(10)
    replica_run()


def replica_run() -> None:
    """`WAITAOF 0 1` on a primary with one replica (both `appendfsync always`): the wait goes
    out after the command's reply (see AckedWrites), so the replica's acknowledgement comes at
    once instead of with its next periodic one."""
    with tempfile.TemporaryDirectory(prefix="flashgate-durability-") as d:
        procs = []
        ports = [free_port(), free_port()]
        try:
            for i, port in enumerate(ports):
                extra = ["--replicaof", "127.0.0.1", str(ports[0])] if i else []
                procs.append(
                    subprocess.Popen(
                        [
                            server_binary(),
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--dir",
                            f"{d}",
                            "--appendfilename",
                            f"a{i}.aof",
                            "--appenddirname",
                            f"aof{i}",
                            "--save",
                            "",
                            "--appendonly",
                            "yes",
                            "--appendfsync",
                            "always",
                            *extra,
                        ],
                        stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                )
                wait_for_ping(f"redis://127.0.0.1:{port}/0", 10, procs[-1])
            url = f"redis://127.0.0.1:{ports[0]}/0"
            time.sleep(1.0)  # the replica's first sync
            out = uvloop.run(run(url, True, replicas=1))
            print("appendfsync always    WAITAOF 0 1 (1 replica)", out, file=sys.stdout)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
