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
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from gateway.config import Settings
from gateway.errors import BackendUnavailable

T = TypeVar("T")
log = logging.getLogger("flashgate")


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def create_client(settings: Settings, url: str | None = None) -> Redis:
    """A client for `url` (default `settings.redis_url`): no retries, a per-call deadline, a
    bounded pool whose waiters also give up at the deadline."""
    target = url or settings.redis_url
    if not target:
        raise ValueError("no Redis URL: set REDIS_URL or run `flashgate serve`")
    timeout = settings.redis_timeout_ms / 1000
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


def create_script_client(settings: Settings, url: str | None = None) -> Multiplexed | None:
    """The order path's client: the multiplexed one (`FLASHGATE_REDIS_CLIENT=mux`, the
    default), or None to run scripts on the pool client."""
    target = url or settings.redis_url
    if settings.redis_client != "mux" or not target:
        return None
    return Multiplexed(target, timeout_s=settings.redis_timeout_ms / 1000)


async def call(awaitable: Awaitable[T]) -> T:
    """Await one Redis operation; any Redis or socket failure leaves as BackendUnavailable."""
    try:
        return await awaitable
    except (RedisError, OSError) as exc:  # OSError: a socket error redis-py did not wrap
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
        timeout_ms: int,  # Multiplexed | Redis
    ) -> None:
        self.client = client
        self.local = local
        self.replicas = replicas
        self.barrier = ("WAITAOF", local, replicas, max(1, timeout_ms))

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        if isinstance(self.client, Multiplexed):
            reply, acks = await self.client.execute_with_barrier(self.barrier, *args)
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

    def _flush(self) -> None:
        if self._barrier is not None:
            command, done = self._barrier
            self._barrier = None
            self._out.append(command)
            self.pending.append((done, self._loop.time() + self.timeout_s, self.received))
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

    async def execute_with_barrier(self, barrier: tuple[Any, ...], *args: Any) -> Any:
        """One command, then `barrier` (sent once after every command of this event-loop
        tick that asks for it, in the same write): (the command's reply, the barrier's)."""
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        fut, done = wire.send_with_barrier(_encode(args), _encode(barrier))
        reply = await fut
        # shared by every caller of the tick: one caller cancelled must not cancel the rest
        return reply, await asyncio.shield(done)

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
