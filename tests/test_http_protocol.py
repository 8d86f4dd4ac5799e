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
