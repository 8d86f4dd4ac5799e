"""A throwaway Valkey cluster on 127.0.0.1, built from the valkey-server flashgate embeds.

For tests and local experiments with a sharded store: `LocalCluster(tmp).start()` runs N
primaries (and optional replicas), splits the 16384 hash slots evenly among the primaries,
and returns once every node agrees the cluster is complete. `migrate_slot` moves one slot
between primaries with the standard IMPORTING/MIGRATING procedure; with `finish=False` it
stops inside the redirection window (ASK, TRYAGAIN) so a test can watch clients there.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.ops import clusterinfo, embedded
from gateway.ops.embedded import die_with_parent, free_ports, kill_group, server_binary, tail

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 5000
"""A node unreachable this long is flagged failing; short enough for tests that kill one."""
_START_ATTEMPTS = 3
_POLL_S = 0.05


class LocalCluster:
    """`primaries` primaries with `replicas` replicas each, one valkey-server process per node.

    Ports are chosen at `start()` unless given (`primaries * (1 + replicas)` of them, the
    primaries first). Each node keeps its cluster config in `<directory>/nodes-<port>.conf`,
    its data in `<directory>/<port>/` and its log in `<directory>/node-<port>.log`. The
    processes get SIGTERM if the thread that started them dies.
    """

    def __init__(
        self,
        directory: str | Path,
        primaries: int = 3,
        replicas: int = 0,
        ports: list[int] | None = None,
        appendonly: bool = False,
        *,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        appendfsync: str = "everysec",
        allocator: embedded.Allocator = "mimalloc",
    ) -> None:
        clusterinfo.check_layout(primaries, replicas, ports)
        self.directory = Path(directory).resolve()
        self.primaries = primaries
        self.replicas = replicas
        self.appendonly = appendonly
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync  # with appendonly: "everysec" or "always"
        self.env = embedded.server_env(allocator)
        self._fixed_ports = list(ports) if ports is not None else None
        self._ports: list[int] = []
        self._bus_ports: dict[int, int] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._clients: dict[int, redis.Redis] = {}
        self._ids: dict[int, str] = {}

    # -- addresses -------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's port, primaries first (empty before `start()`)."""
        return list(self._ports)

    @property
    def primary_ports(self) -> list[int]:
        return self._ports[: self.primaries]

    @property
    def replica_ports(self) -> list[int]:
        return self._ports[self.primaries :]

    @property
    def pids(self) -> list[int]:
        """The process id of every running node, primaries first."""
        return [self._procs[port].pid for port in self._ports if port in self._procs]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """Every node's (host, port), primaries first."""
        return [(HOST, port) for port in self._ports]

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{port}" for port in self._ports]

    @property
    def url(self) -> str:
        """The first primary's URL: a cluster client discovers the rest from it."""
        if not self._ports:
            raise RuntimeError("the cluster is not started")
        return self.urls[0]

    def node_id(self, port: int) -> str:
        """The 40-character cluster id of the node at `port`."""
        if port not in self._ids:
            self._ids[port] = str(self._cmd(port, "CLUSTER", "MYID"))
        return self._ids[port]

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of the node at `port`, strings decoded; owned here."""
        if port not in self._procs:
            raise ValueError(f"no node of this cluster listens on port {port}")
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                host=HOST, port=port, decode_responses=True, socket_timeout=10, retry=_no_retry()
            )
        return self._clients[port]

    def _cmd(self, port: int, *args: str | int) -> Any:
        """One command to the node at `port`, its reply unparsed (strings decoded)."""
        return self.client(port).execute_command(*args)  # type: ignore[no-untyped-call]

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> str:
        """Start every node, build the cluster, wait until every node reports it complete;
        the first node's URL. On failure every process is stopped again."""
        if self._procs:
            raise RuntimeError("the cluster is already started")
        deadline = time.monotonic() + timeout_s
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._launch_all(deadline)
            self._assign_slots()
            self._join(deadline)
            self._settle(deadline, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to every node, SIGKILL to what is left after `timeout_s`. Idempotent."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self._ids.clear()
        procs, self._procs = list(self._procs.values()), {}
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            kill_group(proc, signal.SIGKILL)  # a fork child (AOF rewrite) left behind

    def __enter__(self) -> LocalCluster:
        if not self._procs:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch_all(self, deadline: float) -> None:
        count = self.primaries * (1 + self.replicas)
        if self._fixed_ports is not None:
            self._ports = list(self._fixed_ports)
        else:
            self._ports = free_ports(count)
        taken = set(self._ports)
        self._bus_ports = dict(zip(self._ports, free_ports(count, taken), strict=True))
        taken |= set(self._bus_ports.values())
        for port in self._ports:
            if (config := self._config_file(port)).exists():
                raise RuntimeError(
                    f"{config} is left from an earlier cluster: use a fresh directory"
                )
        for port in self._ports:
            self._procs[port] = self._spawn(port)
        for index, port in enumerate(list(self._ports)):
            for attempt in range(1, _START_ATTEMPTS + 1):
                if self._answers(port, deadline):
                    break
                if self._fixed_ports is not None or attempt == _START_ATTEMPTS:
                    raise RuntimeError(
                        f"cluster node on port {port} did not start; its log:\n"
                        + tail(self._log_file(port))
                    )
                # Another process took the port between free_port() and the bind: new ports.
                del self._bus_ports[port]
                port = free_ports(1, taken)[0]
                self._bus_ports[port] = free_ports(1, taken | {port})[0]
                taken |= {port, self._bus_ports[port]}
                self._ports[index] = port
                self._procs[port] = self._spawn(port)

    def _answers(self, port: int, deadline: float) -> bool:
        """True once our process answers on `port`; False if it exited (most likely the port
        was taken: then whatever holds it may answer, or not at all, until ours has gone)."""
        proc = self._procs[port]
        probe = redis.Redis(
            host=HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=_no_retry()
        )
        try:
            while proc.poll() is None:
                try:
                    if probe.info("server").get("process_id") == proc.pid:
                        return True
                except redis.exceptions.RedisError:
                    pass  # not listening yet, or someone else holds the port
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node on port {port} did not answer in time")
                time.sleep(_POLL_S)
        finally:
            probe.close()
        del self._procs[port]
        return False

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        data = self.directory / str(port)
        data.mkdir(exist_ok=True)
        cmd = [
            server_binary(),
            "--port", str(port),
            "--bind", HOST,
            "--cluster-enabled", "yes",
            # Its own free port: the default, port + 10000, is refused above port 55535,
            # and free_port() hands out ports up to 60999.
            "--cluster-port", str(self._bus_ports[port]),
            "--cluster-config-file", str(self._config_file(port)),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(data),
            # A replica's first full sync would wait 5 s for other replicas to join it.
            "--repl-diskless-sync-delay", "0",
            "--daemonize", "no",
        ]  # fmt: skip
        with self._log_file(port).open("ab") as log:
            return subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )

    def _config_file(self, port: int) -> Path:
        return self.directory / f"nodes-{port}.conf"

    def _log_file(self, port: int) -> Path:
        return self.directory / f"node-{port}.log"

    # -- building the cluster --------------------------------------------------------------

    def _assign_slots(self) -> None:
        """Even contiguous ranges, and distinct config epochs so that no epoch collision
        has to be resolved by gossip before the slot map settles."""
        for index, port in enumerate(self.primary_ports):
            first, last = clusterinfo.slot_range(index, self.primaries)
            self._cmd(port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            self._cmd(port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)

    def _join(self, deadline: float) -> None:
        """Every node meets the first one and learns of the others by gossip; then each
        replica follows its primary, once it has learnt the primary's id (about 1 s).

        Meeting every node directly settled later, not sooner (2.7 to 4 s with replicas
        against about 2.1 s): a node that learns of a replica in the handshake records it
        without its primary until the replica pings it again, which can take seconds."""
        first = self._ports[0]
        for port in self._ports[1:]:
            self._meet(port, first)
        for port in self.replica_ports:
            self._replicate(port, deadline)

    def _meet(self, port: int, other: int) -> None:
        self._cmd(port, "CLUSTER", "MEET", HOST, other, self._bus_ports[other])

    def _primary_of(self, port: int) -> int:
        return self.primary_ports[self.replica_ports.index(port) // self.replicas]

    def _replicate(self, port: int, deadline: float) -> None:
        """The replica at `port` follows its primary, as soon as it has learnt its id."""
        primary = self._primary_of(port)
        while True:
            try:
                self._cmd(port, "CLUSTER", "REPLICATE", self.node_id(primary))
                return
            except redis.exceptions.ResponseError as exc:
                if "Unknown node" not in str(exc) or time.monotonic() > deadline:
                    raise RuntimeError(f"node {port} cannot replicate {primary}: {exc}") from None
            time.sleep(_POLL_S / 5)

    def wait_until_consistent(self, timeout_s: float = 30.0) -> None:
        """Poll until every node reports `cluster_state:ok`, all slots assigned, every node
        known, and all nodes hold the same map of roles and slots. RuntimeError on timeout."""
        self._settle(time.monotonic() + timeout_s, timeout_s)

    def _settle(self, deadline: float, timeout_s: float) -> None:
        while True:
            problem = self._inconsistency()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not settle within {timeout_s:g} s: {problem}")
            time.sleep(_POLL_S)

    def _inconsistency(self) -> str | None:
        """None when the cluster is complete, else what is still wrong."""
        views: dict[int, frozenset[tuple[str, ...]]] = {}
        for port in self._ports:
            raw = str(self._cmd(port, "CLUSTER", "INFO"))
            if clusterinfo.incomplete(raw, len(self._ports)):
                return f"CLUSTER INFO of node {port}:\n" + "\n".join(raw.split())
            if port in self.replica_ports:
                link = self.client(port).info("replication").get("master_link_status")
                if link != "up":
                    return f"replica {port}: master_link_status {link}"
            views[port] = clusterinfo.slot_map(str(self._cmd(port, "CLUSTER", "NODES")))
        first = views[self._ports[0]]
        for port, view in views.items():
            if view != first:
                return f"node {port} disagrees with node {self._ports[0]}: {sorted(view)}"
        return None

    # -- slots -----------------------------------------------------------------------------

    def kill_node(self, port: int) -> None:
        """SIGKILL one node (a crash: its replica, if any, takes over after the node timeout)."""
        proc = self._procs[port]
        proc.kill()
        proc.wait(10)
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def owner_port(self, slot: int) -> int:
        """The port of the primary that serves `slot`, as the first node sees it."""
        clusterinfo.check_slot(slot)
        port = clusterinfo.owner_port(self._cmd(self._ports[0], "CLUSTER", "SLOTS"), slot)
        if port is not None:
            return port
        raise RuntimeError(f"slot {slot} is not served by any node")

    def migrate_slot(
        self, slot: int, to_port: int, *, keys_batch: int = 100, finish: bool = True
    ) -> None:
        """Move `slot` and its keys from its owner to the primary at `to_port`. With
        `finish=False` the keys are moved but the slot stays MIGRATING/IMPORTING (clients
        get ASK or TRYAGAIN) until `finish_migration(slot, to_port)`."""
        clusterinfo.check_slot(slot)
        if to_port not in self.primary_ports:
            raise ValueError(f"{to_port} is not a primary of this cluster")
        from_port = self.owner_port(slot)
        if from_port == to_port:
            return
        self._cmd(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(from_port))
        self._cmd(from_port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port))
        while keys := self._cmd(from_port, "CLUSTER", "GETKEYSINSLOT", slot, keys_batch):
            self._cmd(from_port, "MIGRATE", HOST, to_port, "", 0, 10_000, "KEYS", *keys)
        if finish:
            self.finish_migration(slot, to_port)

    def finish_migration(self, slot: int, to_port: int, timeout_s: float = 30.0) -> None:
        """The last step of `migrate_slot`: `to_port` owns `slot`. Returns once every node
        agrees (their slot maps are equal again)."""
        clusterinfo.check_slot(slot)
        target_id = self.node_id(to_port)
        # The target first: it takes the slot and bumps its epoch, then the source (which
        # starts answering MOVED), then the other primaries so they need not learn it by gossip.
        order = [to_port] + [port for port in self.primary_ports if port != to_port]
        for port in order:
            self._cmd(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_until_consistent(timeout_s)
        if self.owner_port(slot) != to_port:
            raise RuntimeError(f"slot {slot} is served by {self.owner_port(slot)}, not {to_port}")


def _no_retry() -> Retry:
    """Admin commands fail at once: redis-py's default retries turn one 0.5 s timeout into 10 s."""
    return Retry(NoBackoff(), 0)
