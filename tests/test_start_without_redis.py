"""A gateway that starts while Redis is down: `/healthz` 200, `/readyz` 503 and every order
`503 unavailable` with `Retry-After`, until Redis answers; then it loads the scripts, reads
the mode and takes orders, without a restart.

In this process (the app's lifespan, a server started after it), as `flashgate gateway`
(REDIS_URL naming a server that comes up 3 s later), and under `flashgate serve`: its
embedded server killed and held down (serve paused with SIGSTOP, so it cannot restart it
yet), a gateway worker killed and restarted meanwhile, then the server back. Serve never
exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.ops.embedded import free_port, free_ports, server_binary, wait_for_ping
from gateway.ops.localcluster import LocalCluster
from gateway.settings import Settings
from gateway.web.app import create_app
from tests.support.api import ADMIN, ADMIN_TOKEN, create, order_body, put_sku
from tests.support.processes import Serve, role_pid, server_pid
from tests.test_faults import serve_env, stop_and_check_gone, worker_pids

pytestmark = pytest.mark.integration


@contextmanager
def valkey(port: int) -> Iterator[str]:
    """A throwaway server on `port` (no persistence)."""
    proc = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_ping(url, 10, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(5)


def wait_for(check: Callable[[], bool], what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        time.sleep(0.05)


def assert_starting(base: str) -> None:
    """Alive, not ready, and an order refused as the contract's outage answer."""
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["error"] == "unavailable", ready.text
    r = httpx.post(
        f"{base}/api/v1/order/create",
        json=order_body(user_id="early", sku_id="hot"),
        headers={"X-Idempotency-Key": str(uuid.uuid4())},
        timeout=10,
    )
    assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
    assert int(r.headers["Retry-After"]) >= 1


def status_of_order(base: str, user: str) -> int:
    try:
        r = httpx.post(
            f"{base}/api/v1/order/create",
            json=order_body(user_id=user, sku_id="hot"),
            headers={"X-Idempotency-Key": str(uuid.uuid4())},
            timeout=10,
        )
    except httpx.TransportError:
        return 0
    return r.status_code


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def cluster(ports: list[int], directory: Path) -> Iterator[str]:
    """A throwaway 3-primary cluster on `ports`."""
    with LocalCluster(directory, primaries=3, ports=ports) as nodes:
        yield nodes.url


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_app_started_without_redis_opens_once_it_answers(kind: str, tmp_path: Path) -> None:
    ports = free_ports(3)
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{ports[0]}/0",
        redis_cluster=kind == "cluster",
        admin_token=ADMIN_TOKEN,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://flashgate.test") as c,
    ):
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and "Redis has not answered" in r.json()["reason"]
        r = await create(c, sku_id="sku-42")
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert r.headers["Retry-After"] == "1"
        with ExitStack() as stack:
            if kind == "cluster":
                await asyncio.to_thread(stack.enter_context, cluster(ports, tmp_path))
            else:
                stack.enter_context(valkey(ports[0]))
            deadline = time.monotonic() + 15  # tries at most 5 s apart
            while (await c.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready once Redis answered"
                await asyncio.sleep(0.05)
            assert (await put_sku(c, "sku-42", stock=1)).status_code == 201
            assert (await create(c, sku_id="sku-42")).status_code == 202
            r = await create(c, sku_id="sku-42", user_id="u2")
            assert r.status_code == 409 and r.json()["error"] == "sold_out"


async def test_app_stopped_before_redis_ever_answered() -> None:
    """The lifespan ends while the connection is still being tried: nothing left running."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings)
    before = asyncio.all_tasks()
    async with app.router.lifespan_context(app):
        assert any(t.get_name() == "flashgate-connect" for t in asyncio.all_tasks())
        await asyncio.sleep(0.6)  # one retry
    assert asyncio.all_tasks() == before


@pytest.mark.timeout(60)
def test_gateway_whose_redis_comes_up_3_s_later(tmp_path: Path) -> None:
    redis_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLASHGATE_DATA_DIR": str(tmp_path),
    }
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "gateway", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: proc.poll() is not None or healthy(base), "/healthz answers")
        assert proc.poll() is None, log.read_text()
        started = time.monotonic()
        assert_starting(base)
        time.sleep(max(0.0, 3 - (time.monotonic() - started)))
        assert_starting(base)  # still alive and refusing after 3 s of tries
        with valkey(redis_port):
            wait_for(lambda: ready(base), "/readyz 200 once Redis is up", 15)
            r = httpx.put(
                f"{base}/api/v1/admin/skus/hot",
                headers=ADMIN,
                json={"promotion_id": "promo-1", "stock": 5, "per_user_limit": 1},
            )
            assert r.status_code == 201, r.text
            assert status_of_order(base, "u1") == 202
        assert proc.poll() is None
        assert "cannot reach Redis" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # uvicorn re-raises the signal once shut down: no exit code to check
        assert "Application shutdown complete" in log.read_text()


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def startups(s: Serve) -> int:
    return s.log.read_text().count("Application startup complete")


@contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def back_again(s: Serve, workers: set[int]) -> None:
    """Orders 202 again and every worker ready; serve never exited."""
    wait_for(lambda: status_of_order(s.base, f"after-{uuid.uuid4()}") == 202, "a 202", 60)

    def all_ready() -> bool:
        pids = set()
        for _ in range(4 * len(workers)):
            r = httpx.get(f"{s.base}/readyz", timeout=5)
            if r.status_code == 200:
                pids.add(int(r.json()["pid"]))
        return pids == workers

    wait_for(all_ready, f"/readyz 200 from every worker {workers}", 30)
    assert s.proc.poll() is None, s.log.read_text()[-3000:]
    assert "cannot reach Redis" in s.log.read_text()
    assert "taking orders" in s.log.read_text()


@pytest.mark.timeout(120)
def test_serve_worker_restarted_while_its_server_is_down(tmp_path: Path) -> None:
    """uvicorn restarts a killed worker of `serve --workers 2` while the embedded server is
    down (serve paused: it restarts the server once resumed)."""
    data_dir = tmp_path / "data"
    s = Serve(data_dir, "--workers", "2", env=serve_env())
    try:
        s.put_hot(1000)
        assert status_of_order(s.base, "before") == 202
        victim = min(worker_pids(s))
        before = startups(s)
        with paused(s.proc.pid):
            os.kill(server_pid(data_dir), signal.SIGKILL)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: startups(s) > before, "the worker restarted by uvicorn")
            assert victim not in worker_pids(s) and len(worker_pids(s)) == 2
            assert_starting(s.base)
            assert s.proc.poll() is None
        back_again(s, worker_pids(s))
    finally:
        if s.proc.poll() is None:
            stop_and_check_gone(s)


@pytest.mark.timeout(120)
def test_serve_gateway_restarted_while_its_server_is_down(tmp_path: Path) -> None:
    """serve restarts its killed gateway (one worker) and the embedded server dies as the
    new gateway starts (held with SIGSTOP until the server is killed: it starts without)."""
    data_dir = tmp_path / "data"
    s = Serve(data_dir, env=serve_env())
    try:
        s.put_hot(1000)
        killed = role_pid(s, "gateway")
        os.kill(killed, signal.SIGKILL)
        fresh = 0

        def restarted() -> bool:
            nonlocal fresh
            try:
                fresh = role_pid(s, "gateway")
            except AssertionError:
                return False
            return fresh != killed

        wait_for(restarted, "serve starts a new gateway")
        os.kill(fresh, signal.SIGSTOP)  # before its lifespan ran (it is still importing)
        try:
            before = startups(s)
            with paused(s.proc.pid):
                os.kill(server_pid(data_dir), signal.SIGKILL)
                os.kill(fresh, signal.SIGCONT)
                wait_for(lambda: startups(s) > before, "the new gateway's startup")
                assert_starting(s.base)
        finally:
            os.kill(fresh, signal.SIGCONT)
        back_again(s, {fresh})
        assert role_pid(s, "gateway") == fresh
    finally:
        if s.proc.poll() is None:
            stop_and_check_gone(s)
