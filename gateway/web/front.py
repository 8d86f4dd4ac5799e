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
from gateway.web.bodies import header, read_body
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
    `/api/v1/order/{order_id}`). With `fast_path`, the HTTP protocol answers a plain
    `POST` there itself, through `order_answer` and `order_answered` (`fastpath.py`).
    """

    create_order: OrderHandler
    errors: RenderedErrors  # the order path's error answers, rendered once each
    busy_message: str  # the shopper's message on overload answers (settings)
    access_log: bool  # one access-log line per answer (settings)
    route_names: dict[Any, str]  # endpoint -> its path template, the metrics' route label
    clients: ClientAddress  # the client's address, through trusted proxies (settings)
    body_limit: int  # request bodies' size limit, bytes (settings)
    fast_path: bool  # the HTTP protocol answers the order path itself (`fastpath.py`, settings)

    async def order_answer(
        self, headers: list[tuple[bytes, bytes]], body: bytes, scope: Scope
    ) -> tuple[int, str, list[tuple[bytes, bytes]], bytes]:
        """The order endpoint's answer to a whole request: (status, code, headers, body),
        headers built here (no Response object), an error's from a cache of rendered errors.
        `scope` needs only `client` and `headers` (the client's address)."""
        try:
            payload, replayed = await self.create_order(headers, body, scope)
        except GatewayError as exc:
            status, raw, payload = self.errors.render(exc)
            return status, exc.code, raw, payload
        except Exception:
            return self.internal_error()
        length = (b"content-length", b"%d" % len(payload))
        if replayed:
            return 202, "replayed", [JSON, length, REPLAYED], payload
        return 202, "created", [JSON, length], payload

    def internal_error(self) -> tuple[int, str, list[tuple[bytes, bytes]], bytes]:
        response = internal_error("POST", ORDER_PATH)
        return 500, "internal_error", response.raw_headers, bytes(response.body)

    def order_answered(
        self, status: int, code: str, started: float, body: bytes, scope: Scope
    ) -> None:
        """Count an order answer and, when asked, log it (`scope`: `client`, `headers`,
        `method`)."""
        took = time.perf_counter() - started
        metrics.answered(ORDER_PATH, status, code, took)
        if self.access_log:
            order_id = order_id_of(body) if status == 202 else None
            access(scope, ORDER_PATH, status, code, took, order_id, self.clients.of(scope))

    async def _order(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """The order endpoint through ASGI: its answer sent as two ASGI messages."""
        scope["app"] = self
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(headers={"Allow": "POST"})
            body = await read_body(receive, header(headers, b"content-length"), self.body_limit)
        except GatewayError as exc:
            status, raw, body = self.errors.render(exc)
            answer = status, exc.code, raw, body
        except Exception:
            answer = self.internal_error()
        else:
            answer = await self.order_answer(headers, body, scope)
        status, code, raw, body = answer
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
        self.order_answered(status, code, started, body, scope)

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
