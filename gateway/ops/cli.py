"""`flashgate serve | gateway | finalizer | sweeper | audit`: the console script."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import GatewayError
from gateway.ops.embedded import (
    EmbeddedError,
    EmbeddedServer,
    die_with_parent,
    discover,
    kill_group,
)
from gateway.settings import ConfigError, Settings, env_name
from gateway.telemetry import logs
from gateway.transport.replies import REDIS_FAILURES

log = logging.getLogger("flashgate")

_HELP = {
    "redis_url": "Redis/Valkey URL; unset: the embedded server",
    "redis_cluster": "REDIS_URL names a node of a Redis Cluster",
    "redis_timeout_ms": "deadline of one Redis call (ms)",
    "redis_client": "the order path's client: mux (one pipelined connection) or pool",
    "hold_ttl_s": "how long an unpaid hold keeps its stock (s)",
    "idempotency_ttl_s": "how long an accepted answer is replayed (s)",
    "workers": "HTTP worker processes",
    "data_dir": "directory of the embedded server's data",
    "access_log": "one log line per request (request id, route, status, order id); costly",
    "qps": "token bucket refill per second, per gateway instance",
    "burst": "token bucket capacity",
    "queue_max": "most unprocessed orders one SKU's stream may hold",
    "mode_refresh_ms": "how often each worker re-reads the intake mode (ms)",
    "soldout_recheck_ms": "how long a sold-out SKU is refused from memory (ms)",
    "bucket_file": "token-bucket file shared by the workers (default: per port, on tmpfs)",
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = Settings.__dataclass_fields__[field.name].default
        help_text = f"{_HELP.get(field.name, '')} [env {env_name(field.name)}, default {default!r}]"
        if str(field.type) == "bool":
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar="V", help=help_text)


def _settings(args: argparse.Namespace) -> Settings:
    """env > .env > default, with command-line flags above all."""
    overrides = {
        env_name(f.name): str(int(v) if isinstance(v, bool) else v)
        for f in fields(Settings)
        if (v := getattr(args, f.name, None)) is not None
    }
    return Settings.from_env({**os.environ, **overrides})


def _resolve_redis(settings: Settings) -> Settings:
    if settings.redis_url:
        return settings
    _refuse_cluster_without_url(settings)
    return settings.replace(redis_url=discover(settings.data_dir))


def _refuse_cluster_without_url(settings: Settings) -> None:
    """The embedded server is one server: cluster mode names an existing cluster's node."""
    if settings.redis_cluster and not settings.redis_url:
        raise ConfigError(
            f"{env_name('redis_cluster')}=1 needs REDIS_URL naming a node of the cluster "
            "(a local one for trying it: `flashgate local-cluster`)"
        )


def bucket_path(port: int) -> Path:
    """The token-bucket file the workers of the instance on `port` share (tmpfs when there is
    one). One instance per port per host, so a later instance on the port reuses it."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"flashgate-{os.getuid()}-{port}.bucket"


def prepare_multiprocess(directory: Path) -> None:
    """Before uvicorn starts: an empty directory for every worker's metrics files, named in
    the environment the workers inherit (gateway/metrics.py). Totals start again with the
    instance. Here, not in gateway.telemetry.metrics: prometheus-client must not be imported before
    the variable is set, or this process would count in memory only."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # the operator chose one
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def run_gateway(settings: Settings) -> int:
    """The HTTP gateway alone, in this process (uvicorn with uvloop and httptools)."""
    import uvicorn

    settings = _resolve_redis(settings)
    if settings.workers > 1 and not settings.bucket_file:
        settings = settings.replace(bucket_file=str(bucket_path(settings.port)))
    os.environ.update(settings.to_env())
    # every worker's metrics files, added up by whichever worker answers GET /metrics
    prepare_multiprocess(Path(settings.data_dir).resolve() / f"metrics-{settings.port}")
    uvicorn.run(
        "gateway.web.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="gateway.web.protocol:GatewayHttpProtocol",  # httptools, parser errors as JSON
        lifespan="on",
        access_log=False,  # the gateway's own access log, when asked for (gateway/logs.py)
        log_config=logs.uvicorn_config(settings.log_format, settings.log_level),
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        # X-Forwarded-* is deliberately not parsed: the client address the operator audit
        # records is the peer's (a proxy's, behind one), never a header anyone can write;
        # no `server:` header (it names the software and version to every caller).
        proxy_headers=False,
        server_header=False,
    )
    return 0


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
    """`flashgate serve`: the embedded server, then the gateway; stops them in reverse order.

    A crashed embedded server is restarted in place (same data dir and URL, its append-only file
    brings the data back) with a backoff, while the gateway keeps running and reconnects; after
    too many crashes in a row everything shuts down. A gateway that exits shuts everything down.
    """

    def __init__(self, settings: Settings, *, backoff: RestartBackoff | None = None) -> None:
        self.settings = settings
        self.server: EmbeddedServer | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        self.backoff = backoff or RestartBackoff()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *argv],
            env=env,
            preexec_fn=die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop in order
        )
        self.children.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)

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
                _refuse_cluster_without_url(settings)
                self.server = EmbeddedServer(data_dir, appendfsync=settings.appendfsync)
                url = self.server.start()
                log.info("embedded server %s, data in %s", url, data_dir)
                settings = settings.replace(redis_url=url)
            env = {**os.environ, **settings.to_env()}
            # Stopped in reverse: the gateway first, then the finalizer drains what it can.
            self._spawn("sweeper", ["sweeper"], env)
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
        while not self.stopping:
            for name, proc in self.children:
                if proc.poll() is not None:
                    log.error("%s exited with code %s; shutting down", name, proc.returncode)
                    return 1
            if self.server and self.server.proc and self.server.proc.poll() is not None:
                if not self._restart_server(self.server, self.server.proc.returncode):
                    if not self.stopping:
                        return 1
            time.sleep(0.2)
        log.info("stopping")
        return 0

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
        from gateway.transport.replies import REDIS_FAILURES
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


async def _run_role(settings: Settings, role: str) -> int:
    """`flashgate finalizer | sweeper`: one background worker until SIGTERM/SIGINT."""
    from gateway.transport.connect import create_client
    from gateway.transport.replies import REDIS_FAILURES
    from gateway.transport.scripts import ScriptRegistry
    from gateway.workers.finalizer import Finalizer
    from gateway.workers.sweeper import Sweeper

    if role == "finalizer":
        # Blocking reads wait up to finalizer_block_ms on top of the usual deadline.
        client_settings = settings.replace(
            redis_timeout_ms=settings.redis_timeout_ms + settings.finalizer_block_ms
        )
    else:
        client_settings = settings
    client = create_client(client_settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        scripts = ScriptRegistry()
        try:
            await scripts.load_all(client)
        except REDIS_FAILURES as exc:
            print(f"flashgate {role}: cannot reach Redis: {exc}", file=sys.stderr)
            return 1
        worker = (
            Finalizer(client, scripts, settings)
            if role == "finalizer"
            else Sweeper(client, scripts, settings)
        )
        try:
            await worker.run(stop)
        finally:
            await worker.aclose()
        return 0
    finally:
        await client.aclose()


AUDIT_SWEEP_MARGIN_MS = 5000  # a hold may outlive its deadline by one sweep interval plus this


async def _audit(settings: Settings) -> int:
    from gateway.ops.status import text_table
    from gateway.store.inventory import Inventory
    from gateway.transport.connect import create_client
    from gateway.transport.scripts import ScriptRegistry

    client = create_client(settings)
    try:
        scripts = ScriptRegistry()
        inventory = Inventory(client, scripts, settings)
        sku_ids = await inventory.sku_ids()
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        slack_ms = settings.sweep_interval_ms + AUDIT_SWEEP_MARGIN_MS
        header = ("sku_id", "stock", "available", "held", "sold", "backlog", "orders", "status")
        rows: list[tuple[str, ...]] = []
        broken = 0
        for sku_id in sku_ids:
            row = await inventory.audit_sku(sku_id, now_ms=now_ms, slack_ms=slack_ms)
            if row is None:
                rows.append((sku_id, *"------", "BROKEN: registered, no config"))
                broken += 1
                continue
            problems = row.breaches()
            broken += bool(problems)
            status = "ok" if not problems else "BROKEN: " + "; ".join(problems)
            orders = " ".join(f"{st}:{n}" for st, (n, _) in sorted(row.orders.items())) or "-"
            figures = (row.stock, row.available, row.held, row.sold, row.backlog)
            rows.append((sku_id, *(str(x) for x in figures), orders, status))
        print("\n".join(text_table([header, *rows])))
        print(f"{len(sku_ids)} SKU(s), {broken} with broken invariants")
        return 1 if broken else 0
    finally:
        await client.aclose()


async def _dead(settings: Settings, sku_ids: list[str] | None, limit: int) -> int:
    from gateway.ops import status
    from gateway.transport.connect import create_client

    client = create_client(settings)
    try:
        rows = await status.dead_letters(client, sku_ids, limit)
    finally:
        await client.aclose()
    if rows:
        print("\n".join(status.text_table([status.DEAD_HEADER, *rows])))
    print(f"{len(rows)} dead letter(s)")
    return 0


async def _status(settings: Settings, watch_s: float, count: int | None) -> int:
    from gateway.ops import status
    from gateway.transport.connect import create_client

    client = create_client(settings)
    try:
        return await status.run(client, watch_s=watch_s, count=count, out=sys.stdout)
    except KeyboardInterrupt:
        return 0
    finally:
        await client.aclose()


def local_cluster(directory: str, primaries: int, replicas: int, first_port: int) -> int:
    """`flashgate local-cluster`: start a cluster, print how to point flashgate at it, stop
    it on SIGINT or SIGTERM."""
    from gateway.ops.localcluster import LocalCluster

    shutil.rmtree(directory, ignore_errors=True)
    ports = list(range(first_port, first_port + primaries * (1 + replicas)))
    cluster = LocalCluster(directory, primaries, replicas, ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = cluster.start()
    except (RuntimeError, OSError) as exc:
        print(f"flashgate: local cluster did not start: {exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"local cluster up: {primaries} primaries, ports {ports[0]}-{ports[-1]}\n"
            f"  REDIS_URL={url} FLASHGATE_REDIS_CLUSTER=1 flashgate serve --port 8080\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        stop.wait()
    finally:
        cluster.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashgate", description="Flash-sale intake gateway.")
    parser.add_argument("--version", action="version", version=f"flashgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "everything one machine needs, on the embedded server unless REDIS_URL is set"),
        ("gateway", "only the HTTP gateway"),
        ("finalizer", "only a finalizer (several share one consumer group)"),
        ("sweeper", "only the expired-hold sweeper (safe to run more than one)"),
        ("audit", "check the inventory invariants of every SKU"),
        ("status", "mode, stock, backlog and rates of every SKU, in the terminal"),
        ("dead", "list the newest dead letters of every SKU (read only)"),
    ):
        command = sub.add_parser(name, help=text, description=text)
        if name == "status":
            command.add_argument(
                "--watch", type=float, default=0.0, metavar="S",
                help="print the table every S seconds until interrupted (default: once)",
            )  # fmt: skip
            command.add_argument("--count", type=int, default=None, help="stop after N tables")
        if name == "dead":
            command.add_argument("--sku", action="append", help="only this SKU (repeatable)")
            command.add_argument("--limit", type=int, default=20, help="per SKU (default 20)")
        _add_settings_flags(command)
    text = "a throwaway local Redis Cluster (embedded binary) for trying cluster mode"
    local = sub.add_parser("local-cluster", help=text, description=text)
    local.add_argument("--primaries", type=int, default=3, help="primaries (default 3)")
    local.add_argument("--replicas", type=int, default=0, help="replicas per primary (default 0)")
    local.add_argument("--first-port", type=int, default=7000, help="first node's port (7000)")
    local.add_argument(
        "--dir", default=".flashgate-cluster", help="its files, wiped at start (default "
        ".flashgate-cluster)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "local-cluster":
        return local_cluster(args.dir, args.primaries, args.replicas, args.first_port)
    logs.configure("text")  # until the settings say which
    try:
        settings = _settings(args)
        logs.configure(settings.log_format)
        if args.command == "serve":
            return Supervisor(settings).run()
        if args.command == "gateway":
            return run_gateway(settings)
        if args.command in ("finalizer", "sweeper"):
            return asyncio.run(_run_role(_resolve_redis(settings), args.command))
        if args.command == "dead":
            return asyncio.run(_dead(_resolve_redis(settings), args.sku, args.limit))
        if args.command == "status":
            return asyncio.run(_status(_resolve_redis(settings), args.watch, args.count))
        return asyncio.run(_audit(_resolve_redis(settings)))
    except (ConfigError, EmbeddedError) as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return 2
    except (GatewayError, *REDIS_FAILURES) as exc:  # audit, status, dead: Redis out of reach
        print(f"flashgate: Redis is not answering ({type(exc).__name__})", file=sys.stderr)
        return 1
