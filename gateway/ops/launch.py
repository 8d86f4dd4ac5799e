"""One role of flashgate in this process: the HTTP gateway (uvicorn), a finalizer, a sweeper,
a relay, or a throwaway local cluster; and what they need before they start (the Redis URL,
the token bucket file, the metrics directory)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.ops.embedded import discover
from gateway.settings import ConfigError, Settings, env_name
from gateway.telemetry import logs
from gateway.transport.replies import REDIS_FAILURES

log = logging.getLogger("flashgate")
START_RETRY_S = (0.5, 5.0)  # a worker waiting for Redis at start: first pause, longest pause

if TYPE_CHECKING:
    from gateway.transport.connect import Client
    from gateway.transport.scripts import ScriptRegistry


def resolve_redis(settings: Settings) -> Settings:
    if settings.redis_url:
        return settings
    refuse_cluster_without_url(settings)
    return settings.replace(redis_url=discover(settings.data_dir))


def refuse_cluster_without_url(settings: Settings) -> None:
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
    the environment the workers inherit (gateway/telemetry/metrics.py). Totals start again with the
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

    settings = resolve_redis(settings)
    own_file = settings.workers > 1 and not settings.bucket_file
    if own_file:
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
        access_log=False,  # the gateway's own access log, when asked for (telemetry/logs.py)
        log_config=logs.uvicorn_config(settings.log_format, settings.log_level),
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        # uvicorn's own X-Forwarded-* handling stays off: the gateway reads those headers
        # itself, from the peers FLASHGATE_TRUSTED_PROXIES lists only (web/clients.py);
        # no `server:` header (it names the software and version to every caller).
        proxy_headers=False,
        server_header=False,
    )
    if own_file:  # every worker has stopped: the client limits' table goes with them
        Path(f"{settings.bucket_file}.clients").unlink(missing_ok=True)
    return 0


async def run_role(settings: Settings, role: str, *, name: str | None = None) -> int:
    """`flashgate finalizer | sweeper | relay`: one background worker until SIGTERM/SIGINT
    (`name`: the relay's consumer name, when given)."""
    from gateway.transport.connect import create_client
    from gateway.transport.scripts import ScriptRegistry

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
        if not await _load_scripts(client, scripts, role, stop):
            return 0  # stopped while waiting for Redis
        if role == "relay":
            return await run_relay(settings, client, scripts, stop, name=name)
        return await _run_worker(settings, client, scripts, role, stop)
    finally:
        await client.aclose()


async def _load_scripts(
    client: Client, scripts: ScriptRegistry, role: str, stop: asyncio.Event
) -> bool:
    """Load the scripts, waiting for Redis while it cannot be reached (a server restarting
    under `serve` as this worker starts): every 0.5 s, doubling up to 5 s. False: `stop` came
    first."""
    delay = START_RETRY_S[0]
    while True:
        try:
            await scripts.load_all(client)
            return True
        except REDIS_FAILURES as exc:
            log.warning("%s: cannot reach Redis (%s); trying again in %g s", role, exc, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return False
        except TimeoutError:
            delay = min(delay * 2, START_RETRY_S[1])


async def _run_worker(
    settings: Settings, client: Client, scripts: ScriptRegistry, role: str, stop: asyncio.Event
) -> int:
    from gateway.workers.finalizer import Finalizer
    from gateway.workers.sweeper import Sweeper

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


async def run_relay(
    settings: Settings,
    client: Client,
    scripts: ScriptRegistry,
    stop: asyncio.Event,
    *,
    name: str | None = None,
) -> int:
    """The relay until `stop` (a target out of reach is waited for by the relay itself)."""
    from gateway.workers.relay.factory import target_for
    from gateway.workers.relay.loop import Relay

    relay = Relay(client, scripts, settings, target_for(settings), name=name)
    stopping = asyncio.create_task(stop.wait())
    stopping.add_done_callback(lambda _: relay.stop())
    try:
        await relay.run()
    finally:
        stopping.cancel()
    return 0


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
