"""The ASGI entry: the order endpoint served in front of Starlette, and every answer counted
(metrics) and, when asked, logged (`access.py`)."""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, MethodNotAllowed
from gateway.telemetry import metrics
from gateway.web.access import access, order_id_of
from gateway.web.clients import CLIENT, ClientAddress
from gateway.web.orders import ORDER_PATH, OrderHandler
from gateway.web.responses import RenderedErrors, internal_error

ANSWER_CODE = "flashgate.answer_code"  # set in the scope by the error handlers
JSON = (b"content-type", b"application/json")
REPLAYED = (b"idempotent-replayed", b"true")


class GatewayApp(Starlette):
    """The Starlette app, with the order endpoint served in front of it.

    `POST /api/v1/order/create` is the flood's path, so it skips Starlette's middleware stack,
    router and Request object (measured in bench/: about a fifth of the request's CPU) and
    runs as a bare ASGI handler (`create_order`, from `orders.create_handler`) with the same
    error answers. Everything else is Starlette. The handler owns the path: another method
    is a 405 with `Allow: POST` (routed by Starlette, the path matched the order lookup
    `/api/v1/order/{order_id}`).
    """

    create_order: OrderHandler
    errors: RenderedErrors  # the order path's error answers, rendered once each
    busy_message: str  # the shopper's message on overload answers (settings)
    access_log: bool  # one access-log line per answer (settings)
    route_names: dict[Any, str]  # endpoint -> its path template, the metrics' route label
    clients: ClientAddress  # the client's address, through trusted proxies (settings)

    async def _order(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """The order endpoint: its answer sent as two ASGI messages with headers built here
        (no Response object), an error's from a cache of rendered errors."""
        scope["app"] = self
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(headers={"Allow": "POST"})
            body, replayed = await self.create_order(scope, receive)
            status, code = 202, "replayed" if replayed else "created"
            length = (b"content-length", b"%d" % len(body))
            headers = [JSON, length, REPLAYED] if replayed else [JSON, length]
        except GatewayError as exc:
            status, headers, body = self.errors.render(exc)
            code = exc.code
        except Exception:
            response = internal_error("POST", ORDER_PATH)
            status, headers, body = 500, response.raw_headers, bytes(response.body)
            code = "internal_error"
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        took = time.perf_counter() - started
        metrics.answered(ORDER_PATH, status, code, took)
        if self.access_log:
            order_id = order_id_of(body) if status == 202 else None
            access(scope, ORDER_PATH, status, code, took, order_id, self.clients.of(scope))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        if scope["path"] == ORDER_PATH:
            await self._order(scope, receive, send, started)
            return
        status = 500
        scope[CLIENT] = self.clients.of(scope)  # for the operator audit and the log

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, sending)
        finally:
            route = self.route_names.get(scope.get("endpoint"), "unmatched")
            code = scope.get(ANSWER_CODE, "ok" if status < 400 else "error")
            took = time.perf_counter() - started
            metrics.answered(route, status, code, took)
            if self.access_log:
                order_id = scope.get("path_params", {}).get("order_id")
                access(scope, route, status, code, took, order_id, scope[CLIENT])
