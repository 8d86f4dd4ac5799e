"""The HTTP protocol the gateway runs under uvicorn: uvicorn's httptools protocol with two
changes. A request its parser refuses (a malformed request line, header or Content-Length) is
answered with the contract's JSON error body instead of uvicorn's plain text. And a request
head (request line plus headers) is bounded: httptools buffers a head of any size, so one
client could make a worker hold megabytes of headers; past `MAX_HEAD_BYTES` the answer is
`431 headers_too_large` and the connection closes.

After either answer the connection lingers: the answer and an end-of-file are sent, whatever the
client still sends is read and dropped, and the socket closes when the client does or after
`LINGER_S`. Closing at once with unread input would reset the connection and the client would
lose the answer it is owed.

A request must also arrive in time: from the connection's start, or the start of the next
request on it, to the last byte of its body, at most `FLASHGATE_CLIENT_TIMEOUT_S` (default
10 s). A client that trickles a request (slowloris) gets `408 request_timeout` and the
connection closes; one that opened a connection and sent nothing is closed quietly. uvicorn
alone holds such connections forever (its keep-alive timeout runs only between requests).

Both are made cheap for a flood of small requests: a response's head leaves with its body in
one write (`GatewayCycle`; uvicorn writes them apart, one system call each), and no timer is
armed per request: one sweep a second per worker cuts off slow requests and closes connections
idle past uvicorn's keep-alive timeout (uvicorn arms and cancels a timer per request for it),
so an idle connection closes between that timeout and a second after it.

The order path skips the rest: with FLASHGATE_FAST_PATH (on by default), a plain
`POST /api/v1/order/create` is answered by the protocol itself (`fastpath.py`), its head and
body kept in a `FastCycle` that the protections above treat as uvicorn's cycle; the ASGI scope
is built only for requests that go through ASGI.

The head is counted per read while a head is open: at most one read (uvloop reads up to
256 KiB) beyond the bound is ever buffered. A read that ends inside a head counts whole, so a
pipelining client that sends more than the bound of requests in one read, ending mid-head, is
refused too; browsers and load generators do not pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.settings import Settings
from gateway.web import fastpath
from gateway.web.fastpath import FastCycle
from gateway.web.orders import ORDER_PATH

log = logging.getLogger("flashgate")
FAST_PATH = ORDER_PATH.encode()  # the request target the fast path answers (fastpath.py)
MAX_HEAD_BYTES = 32 * 1024
LINGER_S = 2.0
BIG_BODY = 64 * 1024  # a body from which the head is written beside it, not copied into one
MALFORMED = (400, b'{"error":"invalid_request","message":"malformed HTTP request"}')
HEAD_TOO_LARGE = (
    431,
    b'{"error":"headers_too_large","message":"request line and headers exceed %d bytes"}'
    % MAX_HEAD_BYTES,
)
TOO_SLOW = (408, b'{"error":"request_timeout","message":"the request did not arrive in time"}')
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@functools.cache
def read_timeout_s() -> float:
    """The client timeout of this worker, read once from its settings (FLASHGATE_CLIENT_TIMEOUT_S,
    set in its environment by `run_gateway`)."""
    return Settings.from_env().client_timeout_s


# the servers swept (a server's connections, swept on the loop of its first connection)
_sweeping: weakref.WeakSet[ServerState] = weakref.WeakSet()


def _sweep(loop: asyncio.AbstractEventLoop, connections: set[Any], every_s: float) -> None:
    """Once per `every_s`: cut off every connection whose request has been arriving for
    longer than the client timeout. One timer per server (a worker runs one): a timer per
    request (armed and cancelled on each) cost a fifth of the sold-out path's throughput in
    bench/."""
    try:
        now = loop.time()
        limit = read_timeout_s()
        for conn in list(connections):
            since = getattr(conn, "_since", None)
            idle = getattr(conn, "_idle_since", None)
            try:
                if since is not None and now - since > limit:
                    conn._too_slow()
                elif idle is not None and now - idle > conn.timeout_keep_alive:
                    conn._idle_since = None
                    if not conn.transport.is_closing():
                        conn.transport.close()
            except Exception:  # one connection's failure must not end the sweeping
                log.exception("cutting off a slow or idle client failed")
    finally:
        loop.call_later(every_s, _sweep, loop, connections, every_s)


class _HeadHeld:
    """Stands in for the transport while uvicorn writes a response's head: keeps it for the
    body's write."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _HeadFirst:
    """Stands in for the transport while uvicorn writes a response's body: the held head goes
    out with the first write (or before a close, or after, when nothing was written)."""

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        if not head:
            self.transport.write(data)
        elif len(data) < BIG_BODY:
            self.transport.write(head + data)
        else:  # not copied into one buffer (a /metrics text at 10,000 SKUs is megabytes)
            self.transport.writelines((head, data))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        if self.head:
            self.write(b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class GatewayCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, the response's head sent with the first part of its
    body in one write instead of two: every check and header of uvicorn's `send` is kept
    (it writes into a stand-in transport)."""

    _head = b""

    async def send(self, message: ASGISendEvent) -> None:
        transport = self.transport
        if not self.response_started:
            held = _HeadHeld(transport)
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._head = held.head
            return
        if not self._head:
            await super().send(message)
            return
        first = _HeadFirst(transport, self._head)
        self._head = b""
        self.transport = first  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
            if not self.disconnected:
                first.flush()


class GatewayHttpProtocol(HttpToolsProtocol):
    _head_open = False
    _head_bytes = 0
    _refused = False
    _linger: asyncio.TimerHandle | None = None
    _since: float | None = None  # when the request now arriving began (loop time)
    _got_bytes = False
    _idle_since: float | None = None  # kept alive and idle since (loop time)

    _fast: Any = None  # the app, when it lets the protocol answer the order path (fastpath.py)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if isinstance(cycle, FastCycle):  # its turn came in the pipeline
            self._start_fast(cycle)
            return
        cycle.__class__ = GatewayCycle  # uvicorn builds the cycle; this one's `send` is ours
        super()._start_asgi_task(cycle, app)

    def _take_fast(self) -> bool:
        """Take an order request whose head is complete onto the fast path, when it can go
        (`fastpath.py`): False leaves it to uvicorn's cycle and the ASGI app."""
        app = self._fast
        if (
            self.expect_100_continue
            or self.limit_concurrency is not None
            or self.parser.get_method() != b"POST"
            or self.parser.should_upgrade()
            or not fastpath.content_length(self.headers, app.body_limit)
        ):
            return False
        if self.transport.is_closing():
            return True  # after an answer that closed the connection: uvicorn answers none
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        cycle = FastCycle(self.headers, keep_alive)
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._start_fast(cycle)
        else:  # pipelined behind an earlier request: as uvicorn queues one
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))  # type: ignore[arg-type]
        return True

    def _start_fast(self, cycle: FastCycle) -> None:
        cycle.started = True
        if not cycle.more_body:
            self._run_fast(cycle)

    def _run_fast(self, cycle: FastCycle) -> None:
        task = self.loop.create_task(fastpath.answer(self, self._fast, cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, FastCycle):
            cycle.body += body  # within the declared length, itself within the limit
            return
        super().on_body(body)

    def on_response_complete(self) -> None:
        """uvicorn's, without its keep-alive timer: the sweep closes idle connections."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if getattr(self.app, "fast_path", False):
            self._fast = self.app
        self._since = self.loop.time()
        if self.server_state not in _sweeping:
            _sweeping.add(self.server_state)
            every_s = min(1.0, read_timeout_s() / 4)
            self.loop.call_later(every_s, _sweep, self.loop, self.connections, every_s)

    def _too_slow(self) -> None:
        if self._earlier_unanswered():
            # pipelined behind a request still being answered: that time is the server's,
            # not the client's, and an answer now would come before the earlier one's
            self._since = self.loop.time()
            return
        self._since = None
        if self._refused or self.transport.is_closing():
            return
        answering = self.cycle is not None and self.cycle.response_started
        if answering and not self._head_open:
            # answered early (a 413) while its body was still coming: close, lingering
            self._refused = True
            self._close_lingering()
        elif self._got_bytes:
            # a request arriving too slowly; on a kept-alive connection `cycle` is still the
            # previous, answered request's until this one's head is complete
            self._refuse(*TOO_SLOW)
        else:
            self.transport.close()  # opened and silent

    def _earlier_unanswered(self) -> bool:
        """Is an earlier request of this connection still being answered? (While a new head
        arrives, `cycle` is the earlier request's; once it is complete, a request waiting
        behind a running one sits in uvicorn's `pipeline`.)"""
        if self.pipeline:
            return True
        cycle = self.cycle
        return self._head_open and cycle is not None and not cycle.response_complete

    def on_message_complete(self) -> None:
        self._since = None
        cycle = self.cycle
        if isinstance(cycle, FastCycle):
            if cycle.more_body:
                cycle.more_body = False
                if cycle.started:
                    self._run_fast(cycle)
            return
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: input is dropped
        self._got_bytes = True
        self._idle_since = None
        was_open = self._head_open
        if was_open:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(*HEAD_TOO_LARGE)
                return
        super().data_received(data)
        if not was_open and self._head_open and not self.transport.is_closing():
            self._head_bytes += len(data)  # this read began a head still open: count it all
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(*HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        """uvicorn's, without the ASGI scope: built once the head is complete, for a request
        that does not take the fast path (`_scope`)."""
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._head_open = True
        self._head_bytes = 0
        if self._since is None:  # the next request on a kept-alive connection
            self._since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        if self._fast is not None and self.url == FAST_PATH and self._take_fast():
            return
        self._scope()
        super().on_headers_complete()

    def _scope(self) -> None:
        """uvicorn's scope of the request whose head is complete (its `on_message_begin`,
        the head kept)."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def send_400_response(self, msg: str) -> None:
        """uvicorn's `send_400_response`: same status and `connection: close`, JSON body."""
        self._refuse(*MALFORMED)

    def _refuse(self, status: int, body: bytes) -> None:
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self._head_open = False
        self._refused = True
        self.transport.write(b"".join(head) + body)
        self._close_lingering()

    def _close_lingering(self) -> None:
        """End of file now, the close after LINGER_S (or when the client closes): unread
        input at the close would reset the connection and lose the answer."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._since = None
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)
