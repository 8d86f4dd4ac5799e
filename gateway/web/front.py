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
from gateway.web.responses import error_response, internal_error

ANSWER_CODE = "flashgate.answer_code"  # set in the scope by the error handlers


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
    busy_message: str  # the shopper's message on overload answers (settings)
    access_log: bool  # one access-log line per answer (settings)
    route_names: dict[Any, str]  # endpoint -> its path template, the metrics' route label
    clients: ClientAddress  # the client's address, through trusted proxies (settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        if scope["path"] == ORDER_PATH:
            scope["app"] = self
            try:
                if scope["method"] != "POST":
                    raise MethodNotAllowed(headers={"Allow": "POST"})
                response = await self.create_order(scope, receive)
                code = "created"
                for name, _ in response.raw_headers:
                    if name == b"idempotent-replayed":
                        code = "replayed"
            except GatewayError as exc:
                response = error_response(exc, self.busy_message)
                code = exc.code
            except Exception:
                response = internal_error("POST", ORDER_PATH)
                code = "internal_error"
            await response(scope, receive, send)
            took = time.perf_counter() - started
            metrics.answered(ORDER_PATH, response.status_code, code, took)
            if self.access_log:
                order_id = order_id_of(response) if response.status_code == 202 else None
                client = self.clients.of(scope)
                access(scope, ORDER_PATH, response.status_code, code, took, order_id, client)
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
