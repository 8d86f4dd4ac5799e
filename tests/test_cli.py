"""`flashgate serve | gateway | audit` as real processes over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.ops.embedded import EmbeddedError, EmbeddedServer, free_port, server_binary
from gateway.ops.supervisor import RestartBackoff, Supervisor
from gateway.settings import Settings
from tests.support.api import ADMIN, order_body
from tests.support.processes import Serve, descendants, flashgate, server_pid, stampede, wait_gone

pytestmark = pytest.mark.integration


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def serve(data_dir: Path) -> Iterator[Serve]:
    s = Serve(data_dir)
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_serve_end_to_end_then_clean_stop(serve: Serve, data_dir: Path) -> None:
    serve.put_hot(25)
    codes = asyncio.run(stampede(serve.base, 400, "hot"))
    assert codes == {202: 25, 409: 375}

    audit = flashgate("audit", "--data-dir", str(data_dir))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "hot" in audit.stdout and "ok" in audit.stdout

    tree = descendants(serve.proc.pid)
    assert len(tree) >= 2  # the embedded server and the gateway
    assert serve.stop() == 0
    assert wait_gone(tree) == set()
    assert not (data_dir / "server.url").exists()


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_embedded_server_runs_on_mimalloc_unless_told_libc(data_dir: Path) -> None:
    first = Serve(data_dir)
    try:
        first.put_hot(2)
        assert asyncio.run(stampede(first.base, 3, "hot")) == {202: 2, 409: 1}
        assert "/libmimalloc.so" in mapped_libraries(server_pid(data_dir))
        assert "malloc: mimalloc" in first.log.read_text()
    finally:
        first.stop()
    second = Serve(data_dir, env={"FLASHGATE_EMBEDDED_ALLOCATOR": "libc"})
    try:  # the same data, read back by a server on the C library's malloc
        assert "libmimalloc" not in mapped_libraries(server_pid(data_dir))
        assert "malloc: libc" in second.log.read_text()
        v = httpx.get(f"{second.base}/api/v1/admin/skus/hot", headers=ADMIN).json()
        assert (v["available"], v["held"]) == (0, 2)
    finally:
        second.stop()


def test_an_unknown_allocator_is_refused(tmp_path: Path) -> None:
    r = flashgate("serve", "--data-dir", str(tmp_path), FLASHGATE_EMBEDDED_ALLOCATOR="tc")
    assert r.returncode != 0
    assert "FLASHGATE_EMBEDDED_ALLOCATOR" in r.stderr and "mimalloc" in r.stderr
    assert not (tmp_path / "server.url").exists()


def test_client_gone_mid_body_is_quiet(serve: Serve) -> None:
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", serve.port)) as sock:
            sock.sendall(
                b"POST /api/v1/order/create HTTP/1.1\r\nHost: x\r\n"
                b"X-Idempotency-Key: 0b5a3f6e-8d7c-4e1f-9a2b-3c4d5e6f7a8b\r\n"
                b'Content-Length: 80\r\n\r\n{"user_id": '
            )
    assert httpx.get(f"{serve.base}/healthz").status_code == 200
    time.sleep(0.5)
    log = serve.log.read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes: status, headers, body."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /api/v1/order/create HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS hello on the plain port
    ],
    ids=["content-length", "header-line", "tls-hello"],
)
def test_malformed_http_gets_the_json_error(serve: Serve, request_bytes: bytes) -> None:
    """Requests the HTTP parser refuses are answered like every other bad request: 400 with
    the contract's JSON error body, and the connection closed."""
    status, headers, body = raw_exchange(serve.port, request_bytes)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == {"error": "invalid_request", "message": "malformed HTTP request"}
    assert httpx.get(f"{serve.base}/healthz").status_code == 200


def test_a_huge_head_is_refused_and_a_large_one_served(serve: Serve) -> None:
    """A request head past 32 KiB is 431 with the JSON error, whether it comes in one write
    or trickles in; a head just under the bound is served."""
    import socket

    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    status, headers, body = raw_exchange(serve.port, big)
    assert (status, json.loads(body)["error"]) == (431, "headers_too_large")
    assert headers["content-type"] == "application/json"
    with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        with contextlib.suppress(OSError):  # refused mid-send: the server closed
            for _ in range(100):
                sock.sendall(b"X-Slow: " + b"b" * 1000 + b"\r\n")
                time.sleep(0.002)
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")
    near = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Near: " + b"c" * 30_000 + b"\r\n"
    near += b"Connection: close\r\n\r\n"
    status, _, body = raw_exchange(serve.port, near)
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_accepted_orders_survive_a_restart(data_dir: Path) -> None:
    first = Serve(data_dir)
    httpx.put(
        f"{first.base}/api/v1/admin/skus/s",
        headers=ADMIN,
        json={"promotion_id": "promo-1", "stock": 3, "per_user_limit": 1},
    )
    r = httpx.post(
        f"{first.base}/api/v1/order/create",
        json=order_body(sku_id="s"),
        headers={"X-Idempotency-Key": str(uuid.uuid4())},
    )
    assert r.status_code == 202
    first.stop()
    second = Serve(data_dir)
    try:
        g = httpx.get(f"{second.base}/api/v1/order/{r.json()['order_id']}")
        assert g.status_code == 200 and g.json()["status"] == "HELD"
        v = httpx.get(f"{second.base}/api/v1/admin/skus/s", headers=ADMIN).json()
        assert (v["available"], v["held"]) == (2, 1)
    finally:
        second.stop()


def test_supervisor_killed_leaves_no_orphan(data_dir: Path) -> None:
    s = Serve(data_dir, "--workers", "2")
    tree = descendants(s.proc.pid)
    assert len(tree) >= 4  # server, gateway supervisor, two workers
    s.stop(signal.SIGKILL)
    assert wait_gone(tree) == set()


def create(c: httpx.Client, user: str, sku: str) -> httpx.Response:
    return c.post(
        "/api/v1/order/create",
        json=order_body(user_id=user, sku_id=sku),
        headers={"X-Idempotency-Key": str(uuid.uuid4())},
    )


def test_killed_embedded_server_is_restarted_in_place(data_dir: Path) -> None:
    s = Serve(data_dir, "--breaker-open-s", "1", env={"FLASHGATE_REDIS_TIMEOUT_MS": "300"})
    try:
        with httpx.Client(base_url=s.base, timeout=10) as c:
            r = c.put(
                "/api/v1/admin/skus/k",
                headers=ADMIN,
                json={"promotion_id": "promo-1", "stock": 100, "per_user_limit": 1},
            )
            assert r.status_code == 201
            before = create(c, "u-before", "k")
            assert before.status_code == 202
            url = (data_dir / "server.url").read_text()
            gateway = descendants(s.proc.pid)
            killed = server_pid(data_dir)
            os.kill(killed, signal.SIGKILL)
            assert wait_gone({killed}, 5) == set()

            outage: list[str] = []
            ready_down = False
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, f"no 202 after the kill: {outage}"
                started = time.monotonic()
                r = create(c, f"u-{len(outage)}", "k")
                assert time.monotonic() - started < 3  # the deadline answers, not a hang
                if r.status_code == 202:
                    break
                assert r.status_code == 503, r.text
                assert r.json()["error"] in ("unavailable", "busy"), r.text
                outage.append(r.json()["error"])
                ready_down |= c.get("/readyz").status_code == 503
                time.sleep(0.05)
            assert outage and ready_down  # the restart backoff is at least 0.5 s

            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready again"
                time.sleep(0.1)
            assert server_pid(data_dir) != killed
            assert (data_dir / "server.url").read_text() == url  # the same socket / URL
            assert gateway - {killed} <= descendants(s.proc.pid)  # the gateway kept running
            g = c.get(f"/api/v1/order/{before.json()['order_id']}")
            assert g.status_code == 200 and g.json()["status"] == "HELD"
            assert create(c, "u-after", "k").status_code == 202
        tree = descendants(s.proc.pid)
    finally:
        assert s.stop() == 0
    assert wait_gone(tree) == set()
    assert not (data_dir / "server.url").exists()
    assert "restarting it in 0.5 s" in s.log.read_text()


def test_restart_backoff_doubles_then_gives_up() -> None:
    now = [0.0]
    backoff = RestartBackoff(clock=lambda: now[0])
    delays = []
    for _ in range(6):
        delays.append(backoff.next_delay())
        now[0] += 1
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, None]
    now[0] = 63.5  # restarts were at 0, 1, 2, 3, 4: all but the last have left the 60 s window
    assert backoff.next_delay() == 1.0


def exited() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    return proc


class CrashingServer(EmbeddedServer):
    """Dies at once after every restart, or never comes up at all."""

    def __init__(self, data_dir: Path, *, comes_up: bool) -> None:
        super().__init__(data_dir)
        self.comes_up = comes_up
        self.restarts = 0
        self.proc = exited()

    def restart(self, timeout_s: float = 30.0) -> str:
        self.restarts += 1
        if not self.comes_up:
            raise EmbeddedError("server exited with code 1")
        self.proc = exited()
        return f"redis://127.0.0.1:{free_port()}/0"  # nothing there: script loading fails


@pytest.mark.parametrize("comes_up", [True, False])
def test_supervisor_gives_up_after_repeated_crashes(tmp_path: Path, comes_up: bool) -> None:
    sup = Supervisor(
        Settings(redis_timeout_ms=300),
        backoff=RestartBackoff(first_s=0.01, max_s=0.02, max_restarts=3),
    )
    server = CrashingServer(tmp_path, comes_up=comes_up)
    sup.server = server
    assert sup._watch() == 1
    assert server.restarts == 3


def test_a_child_killed_by_a_signal_is_started_again_one_that_exits_stops_all() -> None:
    """kill -9 of a child: started again with the same arguments; a child that exits by
    itself (here `--version`, code 0) shuts serve down."""
    sup = Supervisor(Settings())
    env = {**os.environ}
    sup._spawn("worker", ["--version"], env)
    ((_, first),) = sup.children
    first.wait(30)
    first.returncode = -signal.SIGKILL  # as if killed: the supervisor starts it again
    assert sup._watch() == 1  # then the new one exits by itself: everything stops
    ((_, second),) = sup.children
    assert second.pid != first.pid and second.args == first.args
    assert second.wait(30) == 0 and len(sup._child_backoff["worker"].restarts) == 1
    sup.shutdown()


def test_a_worker_started_before_its_redis_waits_for_it(tmp_path: Path) -> None:
    """`flashgate finalizer` with nothing yet at REDIS_URL (a server restarting under serve):
    it says so and tries again, starts once the server is up, and stops cleanly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    log = tmp_path / "finalizer.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "gateway", "finalizer"], env=env, stdout=out, stderr=out
        )
    server = None
    try:
        deadline = time.monotonic() + 30
        while "cannot reach Redis" not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        server = subprocess.Popen(
            [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        while "started" not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.kill()
        if server is not None:
            server.terminate()
            server.wait(10)


def test_two_workers_serve_and_stop(data_dir: Path) -> None:
    s = Serve(data_dir, "--workers", "2")
    try:
        httpx.put(
            f"{s.base}/api/v1/admin/skus/w",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 40, "per_user_limit": 1},
        )
        assert asyncio.run(stampede(s.base, 200, "w")) == {202: 40, 409: 160}
        tree = descendants(s.proc.pid)
    finally:
        assert s.stop() == 0
    assert wait_gone(tree) == set()


def test_two_workers_share_one_bucket_and_apply_a_switch_within_a_second(
    data_dir: Path,
) -> None:
    s = Serve(data_dir, "--workers", "2", "--qps", "0.001", "--burst", "10")
    try:
        httpx.put(
            f"{s.base}/api/v1/admin/skus/b",
            headers=ADMIN,
            json={"promotion_id": "promo-1", "stock": 100, "per_user_limit": 1},
        )
        # One budget for the instance: per-worker buckets would let up to 20 through.
        assert asyncio.run(stampede(s.base, 60, "b")) == {202: 10, 429: 50}

        r = httpx.post(
            f"{s.base}/api/v1/order/switch", params={"mode": "QUEUE_ONLY"}, headers=ADMIN
        )
        switched = time.monotonic()
        assert r.status_code == 200
        late: dict[int, set[str]] = {}  # pid -> modes reported over a second after the switch
        seen: set[int] = set()
        while time.monotonic() - switched < 3 and len(late) < 2:
            ready = httpx.get(f"{s.base}/readyz", timeout=5).json()  # a new connection each
            seen.add(ready["pid"])
            if time.monotonic() - switched > 1.0:
                late.setdefault(ready["pid"], set()).add(ready["mode"])
        assert len(seen) == 2, "both workers must have answered"
        assert late == {pid: {"QUEUE_ONLY"} for pid in seen}
    finally:
        assert s.stop() == 0


def test_second_serve_on_one_data_dir_is_refused(serve: Serve, data_dir: Path) -> None:
    other = flashgate("serve", "--port", str(free_port()), "--data-dir", str(data_dir))
    assert other.returncode == 1
    assert "another `flashgate serve`" in other.stderr + other.stdout


def test_audit_without_server_says_so(tmp_path: Path) -> None:
    out = flashgate("audit", "--data-dir", str(tmp_path / "none"))
    assert out.returncode == 2
    assert "no running `flashgate serve`" in out.stderr


def test_audit_reports_a_breach(serve: Serve, data_dir: Path) -> None:
    httpx.put(
        f"{serve.base}/api/v1/admin/skus/x",
        headers=ADMIN,
        json={"promotion_id": "promo-1", "stock": 5, "per_user_limit": 1},
    )
    url = (data_dir / "server.url").read_text().strip()
    with redis.Redis.from_url(url) as client:
        client.hincrby("fg:{x}:sku", "available", 1)  # an oversell, made by hand
    out = flashgate("audit", "--data-dir", str(data_dir))
    assert out.returncode == 1
    assert "BROKEN: stock != available + held + sold" in out.stdout


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    out = flashgate("audit", "--data-dir", str(tmp_path), FLASHGATE_HOLD_TTL_S="soon")
    assert out.returncode == 2
    assert "FLASHGATE_HOLD_TTL_S" in out.stderr


def test_cluster_mode_needs_a_node_url(tmp_path: Path) -> None:
    """The embedded server is one server: cluster mode without REDIS_URL is refused, and so
    is a unix socket URL (a cluster's nodes are found over TCP)."""
    out = flashgate("audit", "--data-dir", str(tmp_path), FLASHGATE_REDIS_CLUSTER="1")
    assert out.returncode == 2
    assert "FLASHGATE_REDIS_CLUSTER=1 needs REDIS_URL" in out.stderr
    out = flashgate("audit", REDIS_URL="unix:///tmp/x.sock", FLASHGATE_REDIS_CLUSTER="1")
    assert out.returncode == 2
    assert "redis:// or rediss://" in out.stderr


def test_worker_factory_freezes_the_start_up_heap() -> None:
    """The worker's start-up heap is out of the collector's sight, so a full collection under
    load scans only what was made since (the latency spikes `bench/` measured)."""
    probe = (
        "import gc; from gateway.web.app import app_from_env; "
        "before = gc.get_freeze_count(); app_from_env(); print(before, gc.get_freeze_count())"
    )
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before == 0
    assert after > 10_000  # the modules, classes and the app itself


def test_secrets_stay_out_of_the_settings_repr() -> None:
    settings = Settings(admin_token="adm-s3cret", payment_secret="pay-s3cret", port=9)
    shown = f"{settings!r} {settings}"
    assert "s3cret" not in shown
    assert "port=9" in shown
    assert settings.replace(port=10).admin_token == "adm-s3cret"  # still there, just not shown


def test_serve_with_fsync_always_and_a_local_wait(data_dir: Path) -> None:
    """`--appendfsync always` reaches the embedded server, and with `--waitaof-local 1` the
    gateway starts on it and accepts orders (each confirmed on disk before its 202)."""
    serve = Serve(data_dir, "--appendfsync", "always", "--waitaof-local", "1")
    try:
        url = (data_dir / "server.url").read_text().strip()
        r = redis.Redis.from_url(url)
        assert r.config_get("appendfsync") == {"appendfsync": "always"}
        r.close()
        serve.put_hot(5)
        assert asyncio.run(stampede(serve.base, 20, "hot")) == {202: 5, 409: 15}
    finally:
        assert serve.stop() == 0


def test_slow_and_silent_clients_are_cut_off(data_dir: Path) -> None:
    """With a 1 s client timeout: a head trickled in, and a body that stops halfway, get
    408 with the JSON error within about the timeout; a silent connection is closed; a
    prompt request on the same server is served; nothing was written for the slow order."""
    import socket

    serve = Serve(data_dir, "--client-timeout-s", "1")
    try:

        def exchange_slowly(first: bytes) -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as sock:
                start = time.monotonic()
                sock.sendall(first)
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        answer += chunk
                return answer, time.monotonic() - start

        head, took = exchange_slowly(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert json.loads(head.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
        assert 0.9 < took < 5
        body, took = exchange_slowly(
            b"POST /api/v1/order/create HTTP/1.1\r\nHost: x\r\n"
            b"X-Idempotency-Key: 0b5a3f6e-8d7c-4e1f-9a2b-3c4d5e6f7a8b\r\n"
            b'Content-Length: 80\r\n\r\n{"user_id": "u1", '
        )
        assert body.startswith(b"HTTP/1.1 408 "), body
        assert 0.9 < took < 5
        silent, took = exchange_slowly(b"")
        assert silent == b"" and 0.9 < took < 5
        # kept alive: one request answered, then the next one's head trickles
        with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b'"ok"}' not in first:
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
            second = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    second += chunk
            assert second.startswith(b"HTTP/1.1 408 "), second
        assert httpx.get(f"{serve.base}/healthz").status_code == 200
        url = (data_dir / "server.url").read_text().strip()
        r = redis.Redis.from_url(url)
        assert r.exists("fg:{u:u1}:ik:0b5a3f6e-8d7c-4e1f-9a2b-3c4d5e6f7a8b") == 0
        r.close()
    finally:
        assert serve.stop() == 0


def test_status_shows_mode_stock_and_rates(serve: Serve, data_dir: Path) -> None:
    serve.put_hot(30)
    assert asyncio.run(stampede(serve.base, 50, "hot")) == {202: 30, 409: 20}
    switch = httpx.post(
        f"{serve.base}/api/v1/order/switch?mode=QUEUE_ONLY",
        headers={**ADMIN, "X-Operator": "alice"},
    )
    assert switch.status_code == 200
    shown = flashgate("status", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].startswith("mode QUEUE_ONLY (switched NORMAL -> QUEUE_ONLY at ")
    assert "by alice from 127.0.0.1" in lines[1]
    row = next(line.split() for line in lines if line.startswith("hot "))
    stock, available, held, sold = (int(x) for x in row[1:5])
    assert (stock, available, held + sold) == (30, 0, 30)
    assert row[7] == "0"  # no dead letters
    watched = flashgate("status", "--data-dir", str(data_dir), "--watch", "0.2", "--count", "2")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("mode QUEUE_ONLY") == 2
    # `flashgate status --watch 0.2 | head -1`: the reader goes, Redis is not blamed
    cmd = [sys.executable, "-m", "gateway", "status", "--data-dir", str(data_dir)]
    piped = subprocess.Popen([*cmd, "--watch", "0.2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    assert piped.stdout is not None and piped.stdout.readline().startswith(b"-- ")
    piped.stdout.close()
    _, err = piped.communicate(timeout=30)
    assert (piped.returncode, err) == (1, b""), err


def test_the_data_dir_is_private(serve: Serve, data_dir: Path) -> None:
    """A data directory flashgate creates holds every order (AOF, log): owner only."""
    assert data_dir.stat().st_mode & 0o777 == 0o700


def test_dead_lists_dead_letters(serve: Serve, data_dir: Path) -> None:
    url = (data_dir / "server.url").read_text().strip()
    with redis.Redis.from_url(url) as r:
        r.sadd("fg:skus", "hot")
        r.xadd("fg:{hot}:dead", {"entry_id": "1-0", "reason": "malformed entry", "event": "x"})
    shown = flashgate("dead", "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    assert "malformed entry" in shown.stdout and "1 dead letter(s)" in shown.stdout
    none = flashgate("dead", "--data-dir", str(data_dir), "--sku", "other")
    assert none.stdout.strip() == "0 dead letter(s)"


def test_audit_without_redis_says_so() -> None:
    for env in ({}, {"FLASHGATE_REDIS_CLUSTER": "1"}):
        out = flashgate("audit", REDIS_URL="redis://127.0.0.1:1/0", **env)
        assert out.returncode == 1
        assert "Redis is not answering" in out.stderr and "Traceback" not in out.stderr
