"""The ASGI application: create_app(settings, *, redis=None) -> Starlette."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from redis.exceptions import ResponseError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.intake.breaker import CircuitBreaker
from gateway.intake.limiter import TokenBucket
from gateway.intake.mode import ModeStore, NoticeWatcher
from gateway.intake.service import Intake, log_transition
from gateway.intake.soldout import SoldOutMemo
from gateway.settings import ConfigError, Settings
from gateway.store.inventory import Inventory
from gateway.store.keys import ID_PATTERN
from gateway.telemetry import logs, metrics
from gateway.transport.client import (
    Client,
    ClusterMux,
    Multiplexed,
    create_client,
    create_script_client,
)
from gateway.transport.scripts import ScriptRegistry
from gateway.web.openapi import render as render_openapi
from gateway.web.operators import RefusalLog
from gateway.web.responses import MsgspecResponse
from gateway.web.routes import create_order, routes

log = logging.getLogger("flashgate")


class Gateway:
    """What the handlers need, built once per process by the lifespan."""

    def __init__(
        self,
        settings: Settings,
        redis: Client,
        scripts: ScriptRegistry,
        fast: Multiplexed | ClusterMux | None = None,
    ) -> None:
        self.settings = settings
        self.inventory = Inventory(redis, scripts, settings, fast=fast)
        breaker = CircuitBreaker(
            rt_ms=settings.breaker_rt_ms,
            slow_ratio=settings.breaker_slow_ratio,
            min_calls=settings.breaker_min_calls,
            window_ms=settings.breaker_window_ms,
            open_s=settings.breaker_open_s,
            on_transition=log_transition,
        )
        metrics.BREAKER_STATE.set(0)  # this worker's series exists from the start
        memo = SoldOutMemo(settings.soldout_recheck_ms / 1000)
        self.modes = ModeStore(redis, scripts)
        self.watcher = NoticeWatcher(
            redis, self.modes, memo, refresh_s=settings.mode_refresh_ms / 1000
        )
        self.intake = Intake(
            self.inventory,
            limiter=TokenBucket(settings.qps, settings.burst, path=settings.bucket_file),
            breaker=breaker,
            memo=memo,
            watcher=self.watcher,
            qps=settings.qps,
        )
        self.breaker = breaker
        # Refused credentials, logged at most once per 10 s per kind (operators.RefusalLog).
        self.admin_refusals = RefusalLog("admin calls (401 unauthorized)")
        self.signature_refusals = RefusalLog("payment signatures (401 bad_signature)")
        self._openapi: bytes | None = None

    def openapi(self) -> bytes:
        """The OpenAPI document, built on first use, then the same bytes."""
        if self._openapi is None:
            self._openapi = render_openapi(self.settings)
        return self._openapi

    def close(self) -> None:
        self.admin_refusals.flush()
        self.signature_refusals.flush()
        self.intake.limiter.close()


def error_response(exc: GatewayError, settings: Settings) -> Response:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message, **exc.extra}
    headers = dict(exc.headers)
    if exc.overload:
        body["message"] = settings.busy_message
    if exc.status in (429, 503):
        headers["Retry-After"] = str(max(1, exc.retry_after_s or 1))
    return MsgspecResponse(body, status_code=exc.status, headers=headers)


def internal_error(method: str, path: str) -> Response:
    """500 for an exception nothing expected (logged with its traceback, never shown)."""
    log.exception("unhandled error on %s %s", method, path)
    return MsgspecResponse(
        {"error": "internal_error", "message": "internal error"}, status_code=500
    )


def create_app(settings: Settings, *, redis: Client | None = None) -> Starlette:
    """The gateway app. With `redis` given, the caller owns that client."""
    scripts = ScriptRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = redis if redis is not None else create_client(settings)
        fast = create_script_client(settings)
        try:
            await scripts.load_all(client)
            await check_waitaof(client, settings)
            gateway = app.state.gateway = Gateway(settings, client, scripts, fast)
            await gateway.watcher.start()
            flushing = asyncio.create_task(metrics.flush_every(METRICS_FLUSH_S))
            try:
                yield
            finally:
                flushing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flushing
                await gateway.watcher.stop()
                gateway.close()
        finally:
            if fast is not None:
                await fast.aclose()
            if redis is None:
                await client.aclose()

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        request.scope[ANSWER_CODE] = exc.code
        return error_response(exc, settings)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            request.scope[ANSWER_CODE] = NotFound.code
            return error_response(NotFound(), settings)
        if exc.status_code == 405:
            request.scope[ANSWER_CODE] = MethodNotAllowed.code
            err = MethodNotAllowed(headers=dict(exc.headers or {}))
            return error_response(err, settings)
        body = {"error": "http_error", "message": str(exc.detail)}
        return MsgspecResponse(body, status_code=exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request.scope[ANSWER_CODE] = "internal_error"
        return internal_error(request.method, request.url.path)

    app = GatewayApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: on_gateway_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.route_names = {route.endpoint: route.path for route in routes}
    # A path with a trailing slash is a 404, not a redirect: API clients do not follow one,
    # and its Location is built from the request's Host header (a redirect anywhere).
    app.router.redirect_slashes = False
    return app


ORDER_PATH = "/api/v1/order/create"
ANSWER_CODE = "flashgate.answer_code"  # set in the scope by the error handlers
METRICS_FLUSH_S = 1.0  # how often a worker writes its counts for the others' scrapes


class GatewayApp(Starlette):
    """The Starlette app, with the order endpoint served in front of it.

    `POST /api/v1/order/create` is the flood's path, so it skips Starlette's middleware stack,
    router and Request object (measured in bench/: about a fifth of the request's CPU) and
    runs as a bare ASGI handler with the same error answers. Everything else is Starlette.
    The handler owns the path: another method is a 405 with `Allow: POST` (routed by
    Starlette, the path matched the order lookup `/api/v1/order/{order_id}`).
    """

    route_names: dict[Any, str]  # endpoint -> its path template, the metrics' route label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        if scope["path"] == ORDER_PATH:
            scope["app"] = self
            gateway: Gateway = self.state.gateway
            try:
                if scope["method"] != "POST":
                    raise MethodNotAllowed(headers={"Allow": "POST"})
                response = await create_order(gateway, scope, receive)
                code = "created"
                for name, _ in response.raw_headers:
                    if name == b"idempotent-replayed":
                        code = "replayed"
            except GatewayError as exc:
                response = error_response(exc, gateway.settings)
                code = exc.code
            except Exception:
                response = internal_error("POST", ORDER_PATH)
                code = "internal_error"
            await response(scope, receive, send)
            took = time.perf_counter() - started
            metrics.answered(ORDER_PATH, response.status_code, code, took)
            if gateway.settings.access_log:
                order_id = _order_id_of(response) if response.status_code == 202 else None
                access(scope, ORDER_PATH, response.status_code, code, took, order_id)
            return
        status = 500

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
            gw: Gateway | None = getattr(self.state, "gateway", None)
            if gw is not None and gw.settings.access_log:
                order_id = scope.get("path_params", {}).get("order_id")
                access(scope, route, status, code, took, order_id)


_access_log = logging.getLogger("flashgate.access")
_REQUEST_ID = re.compile(ID_PATTERN)  # a request id the client gives is an id like the others


def access(
    scope: Scope, route: str, status: int, code: str, seconds: float, order_id: str | None
) -> None:
    """One access-log line (gateway/logs.py): the client's X-Request-Id when it is an id,
    else a new one; never another header, never a body."""
    given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
    text = given.decode("latin-1")
    request_id = text if _REQUEST_ID.match(text) else uuid.uuid4().hex
    fields = {
        "request_id": request_id,
        "method": scope["method"],
        "route": route,
        "status": status,
        "code": code,
        "duration_ms": round(seconds * 1000, 3),
    }
    if order_id:
        fields["order_id"] = order_id
    # the fields are in the message too, for FLASHGATE_LOG_FORMAT=text
    _access_log.info(
        "%s %s %d %s %.3f ms request_id=%s order_id=%s",
        scope["method"], route, status, code, fields["duration_ms"], request_id,
        order_id or "-", extra=fields,
    )  # fmt: skip


def _order_id_of(response: Response) -> str | None:
    """The order id of a 202 order answer (a replay's too)."""
    try:
        order_id = msgspec.json.decode(response.body).get("order_id")
    except (msgspec.DecodeError, AttributeError):
        return None
    return order_id if isinstance(order_id, str) else None


async def check_waitaof(client: Client, settings: Settings) -> None:
    """Refuse to start when WAITAOF is asked for and the server cannot give it (older than
    7.2, or no AOF for a local wait): every order would be held, then answered 503."""
    if not (settings.waitaof_local or settings.waitaof_replicas):
        return
    try:
        await client.execute_command("WAITAOF", settings.waitaof_local, 0, 1)
    except ResponseError as exc:
        raise ConfigError(
            "FLASHGATE_WAITAOF_LOCAL/REPLICAS need Redis or Valkey >= 7.2 with appendonly "
            f"yes: the server answered {exc}"
        ) from None


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: settings come from the environment."""
    # A worker spawned by uvicorn (--workers > 1) starts with an unconfigured root logger: the
    # INFO lines of operator changes would be lost. No-op when the root has a handler already.
    settings = Settings.from_env()
    logs.configure(settings.log_format, force=False)
    app = create_app(settings)
    settle_heap()
    return app


def settle_heap() -> None:
    """Take what the process holds after start-up (modules, classes, the app) out of the
    cyclic garbage collector's sight. Requests in flight survive young collections and are
    promoted, so full collections come every fraction of a second under load; each scanned the
    whole start-up heap (15-50 ms measured, every one a latency spike for the requests waiting
    behind it). Frozen, a full collection scans only what was made since (`bench/`)."""
    gc.collect()
    gc.freeze()
