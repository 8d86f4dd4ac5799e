"""The benchmark's processes and its HTTP helpers: the embedded server, the server under
test pinned alone to the first core (bare Starlette, the gateway, the naive service), the
counting proxy; stopped together, whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.countproxy import CountingProxy
from gateway.ops.embedded import Allocator, EmbeddedServer, free_port

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADMIN_TOKEN = "bench-admin-token"
ORDER = "/api/v1/order/create"
PROMO = "bench"


# --------------------------------------------------------------------------- processes


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def wait_port(port: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far, with its live children's (the workers
    of a `--workers` > 1 gateway)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        fields = tail.split()
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # itself, or a child
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Stack:
    """Every process the benchmark starts; stopped together, whatever happens."""

    def __init__(
        self,
        work: Path,
        server_cpu: int,
        load_cpu: int,
        workers: int = 1,
        malloc: Allocator = "mimalloc",
    ) -> None:
        self.work = work
        self.workers = workers
        self.server_cpu = server_cpu
        self.load_cpu = load_cpu
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.embedded = EmbeddedServer(work / "valkey", allocator=malloc)  # as `flashgate serve`
        self.redis_url = ""
        self.proxy: CountingProxy | None = None

    def start(self) -> None:
        self.redis_url = self.embedded.start()
        assert self.embedded.proc is not None
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(self.load_cpu), str(self.redis_pid())],
            check=True,
            capture_output=True,
        )
        uvicorn = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--no-proxy-headers",  # the settings `flashgate gateway` runs uvicorn with
            "--no-server-header",
        ]
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_QPS": "1000000000",
            "FLASHGATE_BURST": "1000000000",
            "FLASHGATE_QUEUE_MAX": "1000000000",
            "FLASHGATE_LOG_LEVEL": "warning",
            "FLASHGATE_WORKERS": str(self.workers),  # all of them on the server's one core
            "PYTHONPATH": str(HERE.parent),
        }
        self.proxy = CountingProxy(self.redis_url)
        counted_url = self.proxy.start()
        for name, argv in (
            ("bare", [*uvicorn, "bench.apps:bare_app"]),
            ("naive", [*uvicorn, "bench.apps:naive_app"]),
            ("gateway", [sys.executable, "-m", "gateway", "gateway"]),
            ("counted", [sys.executable, "-m", "gateway", "gateway"]),  # Redis via the proxy
        ):
            port = self.ports[name] = free_port()
            extra = ["--port", str(port)]
            proc_env = {**env, "FLASHGATE_PORT": str(port)}
            if name == "counted":
                proc_env["REDIS_URL"] = counted_url
            self.procs[name] = subprocess.Popen(
                pinned(self.server_cpu, argv + (extra if argv[2] == "uvicorn" else [])),
                env=proc_env,
                cwd=self.work,
                start_new_session=True,
            )
        for port in self.ports.values():
            wait_port(port)

    def redis_first(self, first: bool) -> bool:
        """Redis at real-time priority (`first`) or back to normal; False when the system did
        not allow it (it needs CAP_SYS_NICE). Redis is part of the system under test; the load
        generators share its core only because the machine has two. First, Redis runs the
        moment it has work, as on a core of its own, and a generator takes what it leaves (the
        generator's own lag is measured and reported); otherwise the scheduler lets a busy
        generator run out its slice first, 1 to 5 ms on a script's round trip."""
        policy = ["-f", "1"] if first else ["-o", "0"]
        chrt = ["chrt", *policy[:1], "-a", "-p", policy[1], str(self.redis_pid())]
        if subprocess.run(chrt, capture_output=True).returncode == 0:
            return True
        print("bench: Redis's priority could not be changed", file=sys.stderr)
        return False

    def redis_pid(self) -> int:
        assert self.embedded.proc is not None
        return self.embedded.proc.pid

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.embedded.stop()
        if self.proxy is not None:
            self.proxy.stop()


# --------------------------------------------------------------------------- HTTP helpers


def http(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def put_sku(port: int, sku: str, stock: int, per_user_limit: int = 1) -> None:
    status, body = http(
        port,
        "PUT",
        f"/api/v1/admin/skus/{sku}",
        {"promotion_id": PROMO, "stock": stock, "per_user_limit": per_user_limit},
        admin(),
    )
    if status not in (200, 201):
        raise RuntimeError(f"PUT {sku}: {status} {body}")


def order(port: int, sku: str, user: str, key: str) -> tuple[int, dict[str, Any]]:
    return http(
        port,
        "POST",
        ORDER,
        {"user_id": user, "sku_id": sku, "quantity": 1, "promotion_id": PROMO},
        {"X-Idempotency-Key": key},
    )


def settled(port: int, sku: str, user: str, key: str | None = None) -> int:
    """An order's status once the gateway is not refusing for overload: a busy machine can
    open the breaker in the run before (503 busy, for its open time), which is not this
    order's answer."""
    key = key or str(uuid.uuid4())
    deadline = time.monotonic() + 30
    while True:
        status = order(port, sku, user, key)[0]
        if status not in (429, 503) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def switch(port: int, mode: str) -> None:
    status, body = http(port, "POST", f"/api/v1/order/switch?mode={mode}", None, admin())
    if status != 200:
        raise RuntimeError(f"switch to {mode}: {status} {body}")
    time.sleep(0.05)
