"""A TCP proxy in front of the real server whose faults the tests control.

Modes: "pass" forwards both ways; "hang" swallows every command containing a marker (the
caller never gets an answer, the server never sees it); "reset" aborts the connection when a
marker arrives; `delay_s` delays every answer, `delay_once_s` the next one.
It records every chunk clients sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlparse


class FaultProxy:
    def __init__(
        self,
        upstream_url: str,
        *,
        mode: str = "pass",
        marker: bytes = b"EVALSHA",
        tls: ssl.SSLContext | None = None,  # clients speak TLS to the proxy (rediss://)
    ):
        parsed = urlparse(upstream_url)
        self.tls = tls
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.mode = mode
        self.marker = marker
        self.delay_s = 0.0
        self.delay_once_s = 0.0  # delays only the next answer
        self.sent: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def count(self, word: bytes) -> int:
        return sum(chunk.count(word) for chunk in self.sent)

    async def _pipe_up(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
    ) -> None:
        while data := await reader.read(65536):
            self.sent.append(data)
            if self.marker in data and self.mode == "reset":
                client.transport.abort()
                writer.transport.abort()
                return
            if self.marker in data and self.mode == "hang":
                continue
            writer.write(data)
        writer.close()

    async def _pipe_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            delay = self.delay_s
            if self.delay_once_s:
                delay, self.delay_once_s = self.delay_once_s, 0.0
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        tasks = [
            asyncio.ensure_future(self._pipe_up(reader, up_writer, writer)),
            asyncio.ensure_future(self._pipe_down(up_reader, writer)),
        ]
        for t in tasks:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        try:
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks)
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
