"""The order path answered by the HTTP protocol itself (FLASHGATE_FAST_PATH, on by default).

When a `POST /api/v1/order/create` head is parsed with a `Content-Length` within the body
limit (no `Expect: 100-continue`, no upgrade), `GatewayHttpProtocol` keeps its headers and
body in a `FastCycle` instead of building uvicorn's request-response cycle, and once the body
is complete runs one task: `GatewayApp.order_answer` (the same handler, checks and rendered
answers as the ASGI path), then the answer's head and body in one write, formatted as
uvicorn formats them (its status line, its default headers such as `date`, `connection:
close` when the connection ends), then `GatewayApp.order_answered` (metrics, access log).
No ASGI scope, `asyncio.Event`, receive or send messages, no Starlette. Everything else goes
through ASGI: other paths and methods, a query string, a missing, unreadable or too large
`Content-Length` (the ASGI path answers 400 or 413 as always), `Expect: 100-continue`, and
every request when uvicorn wraps the app (its proxy-headers middleware, which flashgate turns
off, or its trace logging): the fast path is taken only when the app is the gateway's own.

A `FastCycle` carries the attributes of uvicorn's cycle that the protocol reads
(`response_complete`, `keep_alive`, `disconnected`, `message_event`...), so pipelining (it
waits in uvicorn's `pipeline` behind an earlier request, reading paused), a graceful shutdown
(the answer closes the connection), the client timeout's sweep and a lost connection treat it
as they treat uvicorn's. Before writing, it waits while the transport's write buffer is
above its high-water mark (uvicorn's flow control), as uvicorn's `send` does.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

if TYPE_CHECKING:
    from gateway.web.front import GatewayApp
    from gateway.web.protocol import GatewayHttpProtocol

log = logging.getLogger("flashgate")


class _Unwaited:
    """Stands in for the cycle's `asyncio.Event`: nothing waits on a fast cycle."""

    def set(self) -> None:
        pass


class FastCycle:
    """One order request on the fast path: its headers and body, and what the protocol reads
    of uvicorn's `RequestResponseCycle` (the same names)."""

    __slots__ = (
        "headers",
        "body",
        "keep_alive",
        "more_body",
        "started",
        "response_started",
        "response_complete",
        "disconnected",
    )
    message_event = _Unwaited()

    def __init__(self, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.headers = headers
        self.body = b""
        self.keep_alive = keep_alive
        self.more_body = True  # the body is still arriving
        self.started = False  # its turn came (not waiting behind an earlier request)
        self.response_started = False
        self.response_complete = False
        self.disconnected = False


class _DefaultHead:
    """uvicorn's default headers (`date`, replaced once a second by its server) as the bytes
    of a response head, made again only when the list is replaced."""

    def __init__(self) -> None:
        self.source: list[tuple[bytes, bytes]] | None = None
        self.head = b""

    def of(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        if headers is not self.source:
            self.head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
            self.source = headers
        return self.head


_defaults = _DefaultHead()


def content_length(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    """Does the head declare a body of at most `limit` bytes in one `Content-Length`?"""
    declared = None
    for name, value in headers:
        if name == b"content-length":
            if declared is not None:
                return False  # llhttp refuses differing ones; the ASGI path answers the rest
            declared = value
    return declared is not None and declared.isdigit() and int(declared) <= limit


async def answer(protocol: GatewayHttpProtocol, app: GatewayApp, cycle: FastCycle) -> None:
    """Answer one whole order request on `protocol`'s connection (a task of its own)."""
    started = time.perf_counter()
    scope: dict[str, Any] = {"client": protocol.client, "headers": cycle.headers}
    try:
        status, code, headers, body = await app.order_answer(cycle.headers, cycle.body, scope)
        if protocol.flow.write_paused and not cycle.disconnected:
            await protocol.flow.drain()
        transport = protocol.transport
        if not (cycle.disconnected or protocol._refused or transport.is_closing()):
            content = [STATUS_LINE[status], _defaults.of(protocol.server_state.default_headers)]
            for name, value in headers:
                content += (name, b": ", value, b"\r\n")
            if not cycle.keep_alive:
                content.append(b"connection: close\r\n")
            content += (b"\r\n", body)
            cycle.response_started = True
            transport.write(b"".join(content))
        cycle.response_complete = True
        if not cycle.keep_alive:
            transport.close()
        protocol.on_response_complete()
    finally:
        if not cycle.response_complete:  # cancelled: nothing was written
            log.error("order request cancelled before its answer")
            protocol.transport.close()
    scope["method"] = "POST"
    app.order_answered(status, code, started, body, scope)
