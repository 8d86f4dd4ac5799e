"""The multiplexed client's wire: one pipelined RESP connection per server, commands out in
order and replies matched in order (an asyncio Protocol with hiredis), and `Multiplexed`,
the order path's client on one server."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from gateway.transport.replies import NotSent

log = logging.getLogger("flashgate")
MANY = 500  # commands in one `execute_many` past which they are packed in a thread
MANY_ARGS = 5000  # or arguments in all


def _encode(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings (str, int, float, bytes; TypeError for
    anything else). Packed by hiredis in C: a fifth of the time of the same loop in Python."""
    packed: bytes = hiredis.pack_command(args)
    return packed


def _encode_all(commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    return [hiredis.pack_command(args) for args in commands]


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


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


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
        self.writes = 0  # writes so far: each one round trip for what it carries
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
            self.writes += 1
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
        self._writes_before = 0  # writes of the connections this client replaced

    @property
    def writes(self) -> int:
        """Writes to the server so far, every connection of this client's: its round trips
        (every command of one event-loop tick leaves in one write)."""
        return self._writes_before + (self._wire.writes if self._wire is not None else 0)

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        return await wire.send(_encode(args))

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Many commands in one write, one round trip: their replies in order, a command's
        failure (its exception) in its place. Raises only when no connection could be made."""
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._connect()
        if len(commands) > MANY or sum(map(len, commands)) > MANY_ARGS:
            # packed in a thread: the loop keeps serving meanwhile
            packed = await asyncio.to_thread(_encode_all, commands)
            wire = self._wire if self._wire is not None and not self._wire.lost else wire
        else:
            packed = _encode_all(commands)
        send = wire.send
        futures = [send(command) for command in packed]
        if not futures:
            return []
        # Replies come in order and deadlines expire in order, and a lost connection fails
        # every command: once the last is done, all are (no gather: a callback per command)
        try:
            await asyncio.shield(futures[-1])
        except asyncio.CancelledError:
            for fut in futures:  # abandoned: their failures are nobody's to report
                fut.add_done_callback(_retrieved)
            raise
        except Exception:
            pass
        return [fut.exception() or fut.result() for fut in futures]

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
            if self._wire is not None:
                self._writes_before += self._wire.writes
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
            self._writes_before += self._wire.writes
            self._wire.abort()
            self._wire = None
