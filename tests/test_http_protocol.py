"""The gateway's HTTP protocol under uvicorn, in process with a slow app: a request pipelined
behind one still being answered is not cut off for the server's time, and its 408, when it
comes, follows the earlier answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from gateway.ops.embedded import free_port
from gateway.web import protocol as http
from tests.support.transports import Recorded


async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(2.0)  # longer than the client timeout below
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("FLASHGATE_CLIENT_TIMEOUT_S", "1")
    http.read_timeout_s.cache_clear()
    port = free_port()
    config = uvicorn.Config(
        slow_app, host="127.0.0.1", port=port, http=http.GatewayHttpProtocol,
        loop="asyncio", lifespan="off", log_level="warning",
    )  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(10)
    http.read_timeout_s.cache_clear()


def test_a_pipelined_request_waits_for_the_earlier_answer(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=15) as sock:
        start = time.monotonic()
        # a whole slow request, then the start of a second one that never ends
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n")
        got = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                got += chunk
        took = time.monotonic() - start
    first, _, rest = got.partition(b"ok")
    assert first.startswith(b"HTTP/1.1 200 "), got  # the earlier answer first
    assert rest.startswith(b"HTTP/1.1 408 "), got  # then the second request's timeout
    assert took > 2.0  # not cut off during the server's own 2 s


def test_an_idle_kept_alive_connection_is_closed_by_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No keep-alive timer per request: the once-a-second sweep closes a connection idle
    past uvicorn's keep-alive timeout (1 s here), and a busy one stays open."""
    monkeypatch.setenv("FLASHGATE_CLIENT_TIMEOUT_S", "1")
    http.read_timeout_s.cache_clear()
    port = free_port()
    config = uvicorn.Config(
        slow_app, host="127.0.0.1", port=port, http=http.GatewayHttpProtocol,
        loop="asyncio", lifespan="off", log_level="warning", timeout_keep_alive=1,
    )  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            for _ in range(4):  # busy for 2 s: answered each time, never closed meanwhile
                sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                time.sleep(0.5)
            idle = time.monotonic()
            assert sock.recv(65536) == b""  # then idle: closed by the server
            assert time.monotonic() - idle < 10
    finally:
        srv.should_exit = True
        thread.join(10)
        http.read_timeout_s.cache_clear()


async def streamed_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/plain")]  # no length: chunked
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        return
    await slow_app(scope, receive, send)


@pytest.mark.parametrize(
    ("request_line", "writes"),
    [
        (b"GET /fast", [b"ok"]),  # head and body: one write
        (b"HEAD /fast", [b""]),  # a head alone: still written, once
        (b"GET /stream", [b"1\r\na\r\n", b"1\r\nb\r\n0\r\n\r\n"]),  # head with the first part
    ],
)
async def test_a_response_head_leaves_with_its_body(
    request_line: bytes, writes: list[bytes]
) -> None:
    config = uvicorn.Config(streamed_app, lifespan="off", log_level="warning")
    config.load()
    proto = http.GatewayHttpProtocol(
        config=config, server_state=uvicorn.server.ServerState(), app_state={}
    )
    transport = Recorded()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(request_line + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(transport.writes) == len(writes)
    head, _, first = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and first == writes[0]
    assert transport.writes[1:] == writes[1:]
    proto.connection_lost(None)
