"""The Redis client boundary: how the gateway connects, and how Redis failures become errors.

On the order path a retried script could hold stock twice, so the client never retries by
itself: every command runs once, within a deadline (`FLASHGATE_REDIS_TIMEOUT_MS`). A caller
that wants to try again sends the same idempotency key, which makes the retry a replay.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from gateway.errors import BackendUnavailable
from gateway.settings import Settings
from gateway.store.keys import SLOTS

T = TypeVar("T")
log = logging.getLogger("flashgate")

# The general client: one server's, or a cluster's (`FLASHGATE_REDIS_CLUSTER=1`).
Client = Redis | RedisCluster
# What a Redis outage raises: redis-py's errors, its cluster client's (not RedisError
# subclasses: "All slots are not covered", no node reachable) and socket errors it did not wrap.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def create_client(settings: Settings, url: str | None = None) -> Client:
    """A client for `url` (default `settings.redis_url`): no retries, a per-call deadline, a
    bounded pool whose waiters also give up at the deadline. In cluster mode a cluster client
    that follows MOVED and ASK (a redirected command did not run, so following it is safe)
    and never resends after a connection failure."""
    target = url or settings.redis_url
    if not target:
        raise ValueError("no Redis URL: set REDIS_URL or run `flashgate serve`")
    timeout = settings.redis_timeout_ms / 1000
    if settings.redis_cluster:
        return RedisCluster.from_url(
            target,
            max_connections=settings.redis_max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=no_retry(),
            require_full_coverage=True,
        )
    pool = BlockingConnectionPool.from_url(
        target,
        max_connections=settings.redis_max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry(),
        health_check_interval=0,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def create_script_client(
    settings: Settings, url: str | None = None
) -> Multiplexed | ClusterMux | None:
    """The order path's client: the multiplexed one (`FLASHGATE_REDIS_CLIENT=mux`, the
    default; one per cluster node in cluster mode), or None to run scripts on the general
    client."""
    target = url or settings.redis_url
    if settings.redis_client != "mux" or not target:
        return None
    if settings.redis_cluster:
        return ClusterMux(target, timeout_s=settings.redis_timeout_ms / 1000)
    return Multiplexed(target, timeout_s=settings.redis_timeout_ms / 1000)


async def call(awaitable: Awaitable[T]) -> T:
    """Await one Redis operation; any Redis or socket failure leaves as BackendUnavailable."""
    try:
        return await awaitable
    except REDIS_FAILURES as exc:  # OSError: a socket error redis-py did not wrap
        raise BackendUnavailable() from exc


def text(value: bytes | str) -> str:
    """A reply value as str (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


class NotSent(RedisConnectionError):
    """The command surely never reached the server (no connection could be made)."""


def _encode(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings (str, int, float, bytes; TypeError for
    anything else). Packed by hiredis in C: a fifth of the time of the same loop in Python."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class NotDurable(RedisError):
    """The write was applied, but the server did not confirm it on disk (or on enough
    replicas) within the deadline: it may be lost on a power failure."""


class AckedWrites:
    """Runs commands as `execute_command` like the client it wraps, each followed in the same
    round trip by `WAITAOF <local> <replicas> <timeout>` (Redis/Valkey >= 7.2): the reply comes
    back only once the write is in the local AOF on disk (`local` 1) and/or in the AOF of
    `replicas` replicas. On the multiplexed client one WAITAOF closes each write, shared by
    every command of the event-loop tick (a group commit); on the pool the two go in one
    pipeline. Fewer acknowledgements than asked raise NotDurable.
    """

    def __init__(
        self,
        client: Any,
        *,
        local: int,
        replicas: int,
        timeout_ms: int,  # Multiplexed | ClusterMux | Redis | RedisCluster
    ) -> None:
        self.client = client
        self.local = local
        self.replicas = replicas
        self.barrier = ("WAITAOF", local, replicas, max(1, timeout_ms))

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        if isinstance(self.client, (Multiplexed, ClusterMux)):
            reply, acks = await self.client.execute_with_barrier(
                self.barrier, *args, after_reply=self.replicas > 0
            )
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*args)
                pipe.execute_command(*self.barrier)
                reply, acks = await pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acks, Exception):
                raise acks
        if isinstance(acks, Exception):
            raise acks
        if int(acks[0]) < self.local or int(acks[1]) < self.replicas:
            raise NotDurable(
                f"WAITAOF: fsynced on {int(acks[0])} local and {int(acks[1])} replica(s), "
                f"{self.local} and {self.replicas} required"
            )
        return reply


def acked(settings: Settings, client: Any) -> Any:
    """`client`, or `client` wrapped in AckedWrites when the settings ask for durable writes
    (FLASHGATE_WAITAOF_LOCAL / _REPLICAS): what a 202 promises runs on this."""
    if not (settings.waitaof_local or settings.waitaof_replicas):
        return client
    return AckedWrites(
        client,
        local=settings.waitaof_local,
        replicas=settings.waitaof_replicas,
        # answered by the server before the client's deadline gives up on it
        timeout_ms=settings.redis_timeout_ms // 2,
    )


def tls_context(query: str) -> ssl.SSLContext:
    """TLS for `rediss://`, with redis-py's URL options: the system's CAs and the host name
    checked by default; `ssl_ca_certs=<file>` for a private CA; `ssl_certfile` and
    `ssl_keyfile` for a client certificate; `ssl_cert_reqs=none` turns verification off."""
    opts = dict(parse_qsl(query))
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    if opts.get("ssl_certfile"):
        ctx.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
    if opts.get("ssl_cert_reqs", "required").lower() in ("none", "cert_none"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("LOADING"):
        return BusyLoadingError(message)  # type: ignore[return-value]
    return ResponseError(message)


class _Wire(asyncio.Protocol):
    """One connection: commands go out in order, replies come back in the same order.

    Every command has the same deadline, so the oldest one in flight is always the next to
    expire: one timer per connection, armed for it, replaces a timer per command.
    """

    def __init__(self, name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader()
        # in flight, oldest first: (future, deadline, replies received when it was sent)
        self.pending: deque[tuple[asyncio.Future[Any], float, int]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.received = 0  # replies so far: a reply count that stops moving marks a stall
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        # one barrier command (WAITAOF) closing this tick's write, and its reply's future
        self._barrier: tuple[bytes, asyncio.Future[Any]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one command; everything queued in one event-loop tick leaves in one write."""
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        deadline = loop.time() + self.timeout_s
        self.pending.append((fut, deadline, self.received))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return fut

    def send_with_barrier(
        self, command: bytes, barrier: bytes
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Queue one command followed, at the end of this tick's write, by `barrier`: one
        barrier for every command of the tick that asks for it (a group commit). Returns
        the command's future and the barrier's."""
        fut = self.send(command)
        if self._barrier is None:
            done: asyncio.Future[Any] = self._loop.create_future()
            # callers that fail first never await it: its failure must not go unretrieved
            done.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            self._barrier = (barrier, done)
        return fut, self._barrier[1]

    def send_barrier(self, barrier: bytes) -> asyncio.Future[Any]:
        """Queue `barrier` alone, at the end of this tick's write (one for every caller of the
        tick): for a barrier that must follow replies already received on this connection
        (WAITAOF for replicas: sent in the same write as the command, the replica's
        acknowledgement of it would come only with its next periodic one, about a second
        later)."""
        if self.lost:
            failed: asyncio.Future[Any] = self._loop.create_future()
            failed.set_exception(RedisConnectionError(f"Connection to {self.name} lost"))
            return failed
        if self._barrier is None:
            done: asyncio.Future[Any] = self._loop.create_future()
            done.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            self._barrier = (barrier, done)
            if not self._out:  # nothing else queued this tick: no flush is scheduled yet
                self._loop.call_soon(self._flush)
        return self._barrier[1]

    def _flush(self) -> None:
        if self._barrier is not None:
            command, done = self._barrier
            self._barrier = None
            self._out.append(command)
            deadline = self._loop.time() + self.timeout_s
            self.pending.append((done, deadline, self.received))
            if self._timer is None:  # a barrier alone (send_barrier): nothing armed it yet
                self._timer = self._loop.call_at(deadline, self._expire)
        out, self._out = self._out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def _expire(self) -> None:
        """Fail every command past its deadline (its reply, if it comes, is dropped); drop
        the connection, failing every command on it, if not one reply came since such a
        command was sent."""
        self._timer = None
        now = self._loop.time()
        stalled = False
        for fut, deadline, seen in self.pending:
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                break
            if not fut.done():
                fut.set_exception(RedisTimeoutError(f"Timeout reading from {self.name}"))
                stalled = stalled or self.received == seen
        if stalled and not self.lost:
            log.warning("redis connection %s stalled; reconnecting", self.name)
            # the rest were sent on the same silent connection: they time out too, whether
            # their own deadline fell in this millisecond or the next
            for fut, _, _ in self.pending:
                if not fut.done():
                    fut.set_exception(RedisTimeoutError(f"Timeout reading from {self.name}"))
            self.abort()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while (reply := self.reader.gets()) is not False:
            self.received += 1
            fut = pending.popleft()[0]
            if fut.done():  # its caller gave up (deadline or cancel): the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.pending:
            fut = self.pending.popleft()[0]
            if not fut.done():
                fut.set_exception(RedisConnectionError(f"Connection to {self.name} lost: {exc}"))

    def abort(self) -> None:
        self.lost = True  # at once: the next command must not queue behind the dead socket
        if self.transport is not None:
            self.transport.abort()


async def _with_barrier(wire: _Wire, command: bytes, barrier: bytes, after_reply: bool) -> Any:
    if after_reply:
        reply = await wire.send(command)
        done = wire.send_barrier(barrier)  # the same connection: it covers that write
    else:
        fut, done = wire.send_with_barrier(command, barrier)
        reply = await fut
    # shared by every caller of the tick: one caller cancelled must not cancel the rest
    return reply, await asyncio.shield(done)


class Multiplexed:
    """A Redis client for the order path: one pipelined connection shared by every request
    of the process. Commands are written in order and their replies matched in order, so no
    request waits for a pool lock or a free connection; the commands of one event-loop tick
    leave in one write. Each command has a deadline; a connection whose replies stop coming
    for a whole deadline is dropped and the next command reconnects. Nothing is retried.

    Speaks `execute_command(*args)` like redis-py, with raw replies and redis-py's
    exceptions, so scripts run on it unchanged.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):  # never echo the URL: a password
            raise ValueError(
                f"the multiplexed client speaks redis://, rediss:// and unix://, not {parts.scheme}://"
            )
        self.url = url
        self.timeout_s = timeout_s
        self._parts = parts
        self._wire: _Wire | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        return await wire.send(_encode(args))

    async def execute_with_barrier(
        self, barrier: tuple[Any, ...], *args: Any, after_reply: bool = False
    ) -> Any:
        """One command, then `barrier` (sent once after every command of this event-loop
        tick that asks for it, in the same write; with `after_reply`, once the command's reply
        is in, on the same connection): (the command's reply, the barrier's)."""
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        return await _with_barrier(wire, _encode(args), _encode(barrier), after_reply)

    async def execute_asking(
        self, args: tuple[Any, ...], barrier: tuple[Any, ...] | None, after_reply: bool = False
    ) -> Any:
        """`ASKING` then one command, adjacent on the connection (ASKING applies to the next
        command only): how a command follows an ASK redirect to a slot being imported. With
        `barrier`, as `execute_with_barrier`."""
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        asking = wire.send(_encode(("ASKING",)))
        asking.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        if barrier is None:
            return await wire.send(_encode(args))
        return await _with_barrier(wire, _encode(args), _encode(barrier), after_reply)

    async def _connect(self) -> _Wire:
        if self._closed:
            raise NotSent("Error connecting to a closed client")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._wire is not None and not self._wire.lost:
                return self._wire  # another request connected meanwhile
            p = self._parts
            name = p.path if p.scheme == "unix" else f"{p.hostname}:{p.port or 6379}"
            wire = _Wire(name, self.timeout_s)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    if p.scheme == "unix":
                        await loop.create_unix_connection(lambda: wire, p.path)
                    else:
                        host = p.hostname or "127.0.0.1"
                        tls = tls_context(p.query) if p.scheme == "rediss" else None
                        await loop.create_connection(
                            lambda: wire, host, p.port or 6379, ssl=tls,
                            server_hostname=host if tls is not None else None,
                        )  # fmt: skip
                    await self._handshake(wire)
            except (OSError, TimeoutError, RedisError) as exc:
                wire.abort()
                raise NotSent(f"Error connecting to {name}: {exc}") from exc
            self._wire = wire
            return wire

    async def _handshake(self, wire: _Wire) -> None:
        p = self._parts
        query = dict(parse_qsl(p.query))
        if p.password:
            user = unquote(p.username) if p.username else None
            auth = ("AUTH", user, unquote(p.password)) if user else ("AUTH", unquote(p.password))
            await wire.send(_encode(auth))
        db = query.get("db") or (p.path.strip("/") if p.scheme == "redis" else "")
        if db and db != "0":
            await wire.send(_encode(("SELECT", db)))

    async def aclose(self) -> None:
        self._closed = True
        if self._wire is not None:
            self._wire.abort()
            self._wire = None


class SlotMoving(RedisError):
    """The key's slot is moving between cluster nodes (a second redirect, TRYAGAIN or
    CLUSTERDOWN): the command did not run. Answered 503 with Retry-After; the client's
    retry with the same idempotency key is safe."""


_REDIRECTS = ("MOVED ", "ASK ")


def first_key(args: tuple[Any, ...]) -> Any:
    """The key a command is routed by: the first script key of EVAL/EVALSHA, else the first
    argument; None for a command without one (PING, WAITAOF)."""
    name = args[0].upper() if isinstance(args[0], str) else args[0]
    if name in ("EVALSHA", "EVAL", b"EVALSHA", b"EVAL"):
        return args[3] if int(args[2]) > 0 else None
    return args[1] if len(args) > 1 and name not in ("PING", "WAITAOF", "SCRIPT") else None


class ClusterMux:
    """The order path's client on a Redis Cluster: one multiplexed connection per node and the
    slot map, so a script goes straight to the node that owns its keys in one round trip.

    Every script's keys share one hash tag (gateway/keys.py), so its first key names its slot.
    A redirected command did not run, so it is followed once: MOVED (the slot has a new owner:
    the map learns it, then reloads) and ASK (the slot is being imported: `ASKING` and the
    command, adjacent on the target's connection). A second redirect, TRYAGAIN (a multi-key
    script while its keys are split by a migration) or CLUSTERDOWN raise SlotMoving. Nothing
    that may have run is ever resent here; the caller's idempotency key handles that.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):  # never echo the URL: a password
            raise ValueError(f"a cluster speaks redis:// or rediss://, not {parts.scheme}://")
        self.timeout_s = timeout_s
        self._parts = parts
        self._seed = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self._nodes: dict[str, Multiplexed] = {}
        self._owner: list[str | None] = [None] * SLOTS
        self._known: list[str] = []  # every node the last CLUSTER SLOTS named
        self._refreshing: asyncio.Task[None] | None = None
        self._loaded = False
        # redirects followed and slot-moving refusals: MOVED, ASK, SLOT_MOVING
        self.redirects: dict[str, int] = {"MOVED": 0, "ASK": 0, "SLOT_MOVING": 0}

    def _node(self, address: str) -> Multiplexed:
        node = self._nodes.get(address)
        if node is None:
            p = self._parts
            userinfo = p.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@{address}" if userinfo else address
            url = f"{p.scheme}://{netloc}" + (f"?{p.query}" if p.query else "")
            node = self._nodes[address] = Multiplexed(url, timeout_s=self.timeout_s)
        return node

    async def refresh(self) -> None:
        """Reload the slot map from CLUSTER SLOTS (the seed node first, then any known one)."""
        addresses = list(dict.fromkeys([self._seed, *self._known, *self._nodes]))
        last: Exception | None = None
        for address in addresses:
            try:
                reply = await self._node(address).execute_command("CLUSTER", "SLOTS")
            except REDIS_FAILURES as exc:
                last = exc
                continue
            owner: list[str | None] = [None] * SLOTS
            host = address.rpartition(":")[0]
            known: list[str] = []
            for start, end, primary, *replicas in reply:
                ip = text(primary[0]) or host  # an empty host means the node we asked
                node = f"{ip}:{int(primary[1])}"
                owner[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
                known += [node, *(f"{text(r[0]) or host}:{int(r[1])}" for r in replicas)]
            self._owner = owner
            self._known = list(dict.fromkeys(known))  # asked next time if the seed is down
            self._loaded = True
            return
        raise NotSent(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except REDIS_FAILURES as exc:
            log.warning("cluster slot map not reloaded: %s", exc)

    async def _route(self, args: tuple[Any, ...]) -> Multiplexed:
        if not self._loaded:
            await self.refresh()
        key = first_key(args)
        address = self._seed if key is None else self._owner[key_slot(_as_bytes(key))]
        if address is None:
            self._refresh_soon()
            raise SlotMoving("CLUSTERDOWN: the slot is not served by any node")
        return self._node(address)

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        return await self._execute(args, None)

    async def execute_with_barrier(
        self, barrier: tuple[Any, ...], *args: Any, after_reply: bool = False
    ) -> Any:
        """`Multiplexed.execute_with_barrier` on the node that owns the command's keys."""
        return await self._execute(args, barrier, after_reply)

    async def _execute(
        self, args: tuple[Any, ...], barrier: tuple[Any, ...] | None, after_reply: bool = False
    ) -> Any:
        node = await self._route(args)
        try:
            if barrier is None:
                return await node.execute_command(*args)
            return await node.execute_with_barrier(barrier, *args, after_reply=after_reply)
        except ResponseError as exc:
            return await self._redirected(exc, args, barrier, after_reply)
        except RedisConnectionError:
            self._refresh_soon()  # a failover may have promoted a replica
            raise

    async def _redirected(
        self,
        exc: ResponseError,
        args: tuple[Any, ...],
        barrier: tuple[Any, ...] | None,
        after_reply: bool,
    ) -> Any:
        message = str(exc)
        if message.startswith(("TRYAGAIN", "CLUSTERDOWN")):
            self._refresh_soon()
            self.redirects["SLOT_MOVING"] += 1
            raise SlotMoving(message) from exc
        if not message.startswith(_REDIRECTS):
            raise exc
        target = self._node(self._learn(exc))
        try:
            if message.startswith("ASK "):
                return await target.execute_asking(args, barrier, after_reply)
            if barrier is None:
                return await target.execute_command(*args)
            return await target.execute_with_barrier(barrier, *args, after_reply=after_reply)
        except ResponseError as again:
            if str(again).startswith((*_REDIRECTS, "TRYAGAIN", "CLUSTERDOWN")):
                self._refresh_soon()
                self.redirects["SLOT_MOVING"] += 1
                raise SlotMoving(f"slot moving: {again}") from again
            raise
        except RedisConnectionError:
            self._refresh_soon()
            raise

    def _learn(self, exc: ResponseError) -> str:
        """The node a redirect names; a MOVED also updates the map and reloads it."""
        kind, slot, address = str(exc).split()[:3]
        self.redirects[kind] = self.redirects.get(kind, 0) + 1
        if kind == "MOVED":
            self._owner[int(slot)] = address
            self._refresh_soon()
        return address

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self._nodes.values():
            await node.aclose()
        self._nodes.clear()


def _as_bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()
