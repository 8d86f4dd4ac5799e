"""The processes of one load run: `flashgate serve` and Locust.

Each starts in its own session, so a terminal's Ctrl-C reaches only the runner, which stops
them in order, and with a parent-death signal, so even a killed runner leaves nothing behind.
Every process seen below them is remembered (pid and start time), to prove none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import psutil

from gateway.ops.embedded import die_with_parent


class Tracker:
    """Every process seen in the trees of the started processes."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[float, str]] = {}

    def scan(self, pid: int | None) -> None:
        if pid is None:
            return
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                self.seen[p.pid] = (p.create_time(), " ".join(p.cmdline())[:120] or p.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def alive(self) -> dict[int, str]:
        """The remembered processes still running (same pid and start time, not a zombie)."""
        left: dict[int, str] = {}
        for pid, (created, what) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left[pid] = what
            except psutil.NoSuchProcess:
                pass
        return left

    def wait_gone(self, timeout_s: float) -> dict[int, str]:
        deadline = time.monotonic() + timeout_s
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left


def _start(argv: list[str], env: dict[str, str], out: IO[bytes] | int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout_s: float) -> int | None:
    """Send `sig`, wait, then SIGKILL the whole process group. The exit code (None: none)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        code: int | None = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group
    except (ProcessLookupError, PermissionError):
        pass
    if code is None:
        code = proc.wait()
    return code


class Serve:
    """`flashgate serve` on the embedded server, in `<out>/data`, logging to `<out>/serve.log`."""

    def __init__(
        self, out: Path, *, port: int, workers: int, env: dict[str, str], options: list[str]
    ) -> None:
        self.data_dir = out / "data"
        self.log_path = out / "serve.log"
        self.base = f"http://127.0.0.1:{port}"
        self.env = env
        self.argv = [
            *(sys.executable, "-m", "gateway", "serve"),
            *("--port", str(port), "--data-dir", str(self.data_dir)),
            *("--workers", str(workers), *options),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, tick: Callable[[], None], timeout_s: float = 60) -> None:
        """Start it and wait until `/readyz` answers 200; `tick` is called meanwhile."""
        with open(self.log_path, "ab") as log:
            self.proc = _start(self.argv, self.env, log)
        deadline = time.monotonic() + timeout_s
        while True:
            tick()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flashgate serve did not become ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def redis_url(self) -> str:
        return (self.data_dir / "server.url").read_text(encoding="utf-8").strip()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM: the supervisor stops the gateway, finalizer, sweeper, then the server (up
        to 30 s each); SIGKILL only if it has not exited after that."""
        return _stop(self.proc, signal.SIGTERM, 120)


class Locust:
    """Locust headless as a subprocess; its output goes to a log file, and to the terminal
    with `echo`."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, echo: bool) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        self.proc = _start(self.argv, self.env, subprocess.PIPE)
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                if self.echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()

    def wait(self, timeout_s: float, tick: Callable[[], None]) -> int | None:
        """Its exit code; None when it outlived `timeout_s` (then it is stopped). `tick` is
        called every second meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            tick()
            if time.monotonic() > deadline:
                self.stop()
                return None
            time.sleep(1)
        if self._pump is not None:
            self._pump.join(10)
        return self.proc.returncode

    def stop(self) -> int | None:
        return _stop(self.proc, signal.SIGTERM, 20)


def child_running(pid: int, role: str) -> int | None:
    """The pid of the `python -m gateway <role>` process below `pid`, if there is one."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in children:
        try:
            argv = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if argv[-2:] == ["gateway", role]:
            return p.pid
    return None


class Throttle:
    """A slow back end: the process `pid` (a finalizer this run started) runs `share` of each
    `period_s` and is stopped (SIGSTOP) for the rest, until `stop`, which lets it run again."""

    def __init__(self, pid: int, share: float, period_s: float = 0.1) -> None:
        self.pid = pid
        self.share = share
        self.period_s = period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._cycle, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _cycle(self) -> None:
        try:
            while not self._done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                if self._done.wait(self.period_s * (1 - self.share)):
                    break
                os.kill(self.pid, signal.SIGCONT)
                self._done.wait(self.period_s * self.share)
        except ProcessLookupError:
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
