"""Real processes in tests: `flashgate serve` on a free port, the CLI, process trees."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import redis

from gateway.ops.embedded import free_port
from tests.support.api import ADMIN, ADMIN_TOKEN, order_body


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Serve:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        environ.update(FLASHGATE_ADMIN_TOKEN=ADMIN_TOKEN, **(env or {}))
        self.log = data_dir.parent / f"serve-{self.port}.log"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(data_dir),
                    *extra,
                ],
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text()
                raise AssertionError(f"serve did not become ready:\n{text}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def put_hot(self, stock: int, *, headers: dict[str, str] | None = None) -> None:
        """Configure SKU "hot" (promotion promo-1, one per shopper) over HTTP: 201."""
        r = httpx.put(
            f"{self.base}/api/v1/admin/skus/hot",
            headers={**ADMIN, **(headers or {})},
            json={"promotion_id": "promo-1", "stock": stock, "per_user_limit": 1},
        )
        assert r.status_code == 201, r.text


def flashgate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def stampede(base: str, n: int, sku: str) -> Counter[int]:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:
        rs = await asyncio.gather(
            *(
                c.post(
                    "/api/v1/order/create",
                    json=order_body(user_id=f"u{i}", sku_id=sku),
                    headers={"X-Idempotency-Key": str(uuid.uuid4())},
                )
                for i in range(n)
            )
        )
    return Counter(r.status_code for r in rs)


def role_pid(serve: Serve, role: str) -> int:
    """The live `python -m gateway <role>` child of `serve` (relay, finalizer, sweeper, ...)."""
    for pid in descendants(serve.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-m", b"gateway", role.encode()]:
            return pid
    raise AssertionError(f"no {role} under serve")


def server_pid(data_dir: Path) -> int:
    """The embedded server's pid, from its own INFO."""
    url = (data_dir / "server.url").read_text().strip()
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])
