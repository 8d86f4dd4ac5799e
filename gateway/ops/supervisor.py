"""`flashgate serve`: the embedded server (unless REDIS_URL names one), then a sweeper, a
finalizer, a relay (with a target) and the gateway as child processes, watched until a signal;
the server, and a child killed by a signal, restarted in place with a backoff."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.ops.embedded import EmbeddedError, EmbeddedServer, die_with_parent, kill_group
from gateway.ops.launch import prepare_multiprocess, refuse_cluster_without_url
from gateway.settings import Settings
from gateway.transport.replies import REDIS_FAILURES

log = logging.getLogger("flashgate")


class RestartBackoff:
    """When to restart a crashed embedded server: after `first_s`, doubling with every restart
    within the last `window_s` up to `max_s`; never (None) once `max_restarts` restarts fall
    within `window_s`. Times in seconds, from an injected monotonic clock."""

    def __init__(
        self,
        *,
        first_s: float = 0.5,
        max_s: float = 5.0,
        max_restarts: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.clock = clock
        self.restarts: deque[float] = deque()

    def next_delay(self) -> float | None:
        """The pause before the next restart (and count it), or None: give up."""
        now = self.clock()
        while self.restarts and now - self.restarts[0] >= self.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            return None
        delay = min(self.first_s * 2.0 ** len(self.restarts), self.max_s)
        self.restarts.append(now)
        return delay


class Supervisor:
    """`flashgate serve`: the embedded server, then the workers and the gateway; stops them in
    reverse order.

    A crashed embedded server is restarted in place (same data dir and URL, its append-only file
    brings the data back) with a backoff, while the children keep running and reconnect; after
    too many crashes in a row everything shuts down. A child killed by a signal (kill -9, an
    OOM kill, a segfault) is started again the same way, with its own backoff: a finalizer's or
    a relay's pending entries are taken over once idle, uvicorn's own workers are restarted by
    uvicorn. A child that exits by itself (a bad setting, a target that refuses what the relay
    declares) shuts everything down: starting it again would fail the same way.
    """

    def __init__(self, settings: Settings, *, backoff: RestartBackoff | None = None) -> None:
        self.settings = settings
        self.server: EmbeddedServer | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        self.backoff = backoff or RestartBackoff()
        self._argv: dict[str, tuple[list[str], dict[str, str]]] = {}  # how each child started
        self._child_backoff: dict[str, RestartBackoff] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.children.append((name, self._start(name, argv, env)))

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *argv],
            env=env,
            preexec_fn=die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop in order
        )
        self._argv[name] = (argv, env)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        settings = self.settings
        data_dir = Path(settings.data_dir).resolve()
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(data_dir / "serve.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another `flashgate serve` is running on %s", data_dir)
            return 1
        try:
            if not settings.redis_url:
                refuse_cluster_without_url(settings)
                self.server = EmbeddedServer(
                    data_dir,
                    appendfsync=settings.appendfsync,
                    allocator=settings.embedded_allocator,
                )
                url = self.server.start()
                log.info(
                    "embedded server %s (malloc: %s), data in %s", url, self.server.malloc, data_dir
                )
                if self.server.malloc != settings.embedded_allocator:
                    log.warning("mimalloc is not installed or could not be preloaded")
                settings = settings.replace(redis_url=url)
            # one metrics directory for every process of the instance: the relay's counts too
            # reach the gateway's GET /metrics
            prepare_multiprocess(data_dir / f"metrics-{settings.port}")
            env = {**os.environ, **settings.to_env()}
            # Stopped in reverse: the gateway first, then the finalizer drains what it can.
            self._spawn("sweeper", ["sweeper"], env)
            if settings.relay_url:  # stopped after the finalizer: its last events go out too
                # one name across restarts: a relay started again resumes what it held at once
                name = f"{socket.gethostname()}-serve-{settings.port}-relay"
                self._spawn("relay", ["relay", "--consumer", name], env)
            self._spawn("finalizer", ["finalizer"], env)
            self._spawn("gateway", ["gateway"], env)
            return self._watch()
        except EmbeddedError as exc:
            log.error("%s", exc)
            return 1
        finally:
            self.shutdown()
            lock.close()

    def _watch(self) -> int:
        """The server first: a child killed while it is down starts again once it is back."""
        while not self.stopping:
            if self.server and self.server.proc and self.server.proc.poll() is not None:
                if not self._restart_server(self.server, self.server.proc.returncode):
                    if not self.stopping:
                        return 1
            for i, (name, proc) in enumerate(self.children):
                code = proc.poll()
                if code is None:
                    continue
                if code < 0 and self._restart_child(i, name, proc):
                    continue
                if self.stopping:
                    break
                log.error("%s exited with code %s; shutting down", name, code)
                return 1
            time.sleep(0.2)
        log.info("stopping")
        return 0

    def _restart_child(self, index: int, name: str, proc: subprocess.Popen[bytes]) -> bool:
        """Start again, after its backoff, a child killed by a signal. False: it was killed
        too often (or a stop signal came while waiting)."""
        kill_group(proc, signal.SIGKILL)  # whatever it left behind in its group
        backoff = self._child_backoff.setdefault(name, RestartBackoff())
        delay, signum = backoff.next_delay(), -(proc.returncode or 0)
        if delay is None:
            log.error("%s killed by signal %d, its %d restarts within %g s are used up",
                      name, signum, backoff.max_restarts, backoff.window_s)  # fmt: skip
            return False
        log.warning("%s (pid %d) killed by signal %d; restarting it in %g s",
                    name, proc.pid, signum, delay)  # fmt: skip
        if not self._pause(delay):
            return False
        argv, env = self._argv[name]
        self.children[index] = (name, self._start(name, argv, env))
        return True

    def _restart_server(self, server: EmbeddedServer, code: int | None) -> bool:
        """Restart the dead server after the backoff, again while it fails to come up.
        False: a signal asked us to stop, or it crashed too often (shut down)."""
        while not self.stopping:
            delay = self.backoff.next_delay()
            if delay is None:
                log.error(
                    "embedded server exited with code %s, its %d restarts within %g s "
                    "are used up; shutting down",
                    code,
                    self.backoff.max_restarts,
                    self.backoff.window_s,
                )
                return False
            log.warning(
                "embedded server exited with code %s; restarting it in %g s (restart %d of "
                "at most %d within %g s)",
                code,
                delay,
                len(self.backoff.restarts),
                self.backoff.max_restarts,
                self.backoff.window_s,
            )
            if not self._pause(delay):
                return False
            try:
                url = server.restart()
            except EmbeddedError as exc:
                code = None
                log.warning("embedded server did not come back: %s", exc)
                continue
            pid = server.proc.pid if server.proc else None
            log.warning("embedded server restarted (pid %s) at %s", pid, url)
            self._load_scripts(url)
            return True
        return False

    def _pause(self, seconds: float) -> bool:
        """Sleep, waking early for a stop signal. False: stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return not self.stopping

    def _load_scripts(self, url: str) -> None:
        """SCRIPT LOAD into the restarted server (scripts are not in its AOF), so /readyz is
        200 again at once; the gateway's NOSCRIPT fallback would otherwise load them lazily."""
        from gateway.transport.connect import create_client
        from gateway.transport.scripts import ScriptRegistry

        async def load() -> None:
            client = create_client(self.settings, url)
            try:
                await ScriptRegistry().load_all(client)
            finally:
                await client.aclose()

        try:
            asyncio.run(load())
        except REDIS_FAILURES as exc:
            log.warning("could not load the scripts into the restarted server: %s", exc)

    def shutdown(self) -> None:
        """Gateway first (it answers what it accepted), then the server (it flushes its AOF)."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30 s; killing it", name)
                kill_group(proc, signal.SIGKILL)
                proc.wait()
            kill_group(proc, signal.SIGKILL)  # any worker left behind in its group
        self.children.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        log.info("stopped")
