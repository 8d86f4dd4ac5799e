"""A TCP proxy in front of Redis that counts the commands its clients send: the benchmark's
measure of Redis round trips per request (a script's own calls are not round trips, and the
server's per-client counters include them, so they cannot tell)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from urllib.parse import urlsplit

import hiredis


class CountingProxy:
    """Runs on its own thread and event loop; `commands` is read from any thread."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream = urlsplit(upstream_url)
        self.commands = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="count-proxy", daemon=True)

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(10)
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        u = self.upstream
        if u.scheme == "unix":
            return await asyncio.open_unix_connection(u.path)
        return await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._open_upstream()
        parser = hiredis.Reader()

        async def up() -> None:
            while data := await reader.read(65536):
                parser.feed(data)
                while parser.gets() is not False:
                    self.commands += 1
                up_writer.write(data)
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
            writer.close()

        with contextlib.suppress(Exception):
            await asyncio.gather(up(), down())
