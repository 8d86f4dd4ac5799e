"""A real webhook receiver for the relay's tests: a small ASGI app served by uvicorn on a free
port, in the test's event loop.

Every delivery is recorded (headers, body, the status answered) and its signature checked with
the `standardwebhooks` package. Knobs: refuse every Nth request or a fraction of them
(deterministically, by request count: 500), hang `hang_s` seconds before answering, stop and
start again on the same port. What it took, deduplicated by `webhook-id`, is `received()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from gateway.ops.embedded import free_port

Scope = dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    signed: bool  # the signature verified

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")


class Receiver:
    def __init__(self, secret: str, *, port: int | None = None) -> None:
        self.webhook = Webhook(secret)
        self.port = port or free_port()
        self.deliveries: list[Delivery] = []
        self.refuse_every = 0  # refuse request number N, 2N, ... (0: never)
        self.refuse_fraction = 0.0  # refuse this share of requests, spread evenly
        self.hang_s = 0.0
        self.requests = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def received(self) -> dict[str, bytes]:
        """Every event taken (answered 2xx), by id."""
        return {d.id: d.body for d in self.deliveries if d.status == 200}

    def bodies(self) -> dict[str, set[bytes]]:
        """Every body seen per id (one each when deliveries of an event carry the same body)."""
        out: dict[str, set[bytes]] = {}
        for d in self.deliveries:
            out.setdefault(d.id, set()).add(d.body)
        return out

    def _refuses(self, n: int) -> bool:
        if self.refuse_every and n % self.refuse_every == 0:
            return True
        f = self.refuse_fraction
        return int(n * f) != int((n - 1) * f)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests += 1
        status = 500 if self._refuses(self.requests) else 200
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        try:
            self.webhook.verify(body, headers)
            signed = True
        except WebhookVerificationError:
            signed = False
        self.deliveries.append(Delivery(headers, body, status, signed))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def start(self) -> None:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning",
            access_log=False, timeout_graceful_shutdown=1,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop listening and close every connection (the port is free again)."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = server.force_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def restart(self) -> None:
        await self.stop()
        await self.start()
