"""The ASGI application: create_app(settings, *, redis=None) -> Starlette; its lifespan, and
the wiring of the resource modules to one `Services` object."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.settings import Settings
from gateway.telemetry import logs, metrics
from gateway.transport.connect import (
    Client,
    create_client,
    create_reader,
    create_script_client,
)
from gateway.transport.scripts import ScriptRegistry
from gateway.web import admin, health, orders, payments
from gateway.web.console import view as console
from gateway.web.front import ANSWER_CODE, GatewayApp
from gateway.web.openapi import Document
from gateway.web.responses import (
    MsgspecResponse,
    RenderedErrors,
    error_response,
    internal_error,
)
from gateway.web.routing import Resource
from gateway.web.services import Services

METRICS_FLUSH_S = 1.0  # how often a worker writes its counts for the others' scrapes
SWITCH_INTERVAL_S = 0.0005  # see app_from_env


def create_app(settings: Settings, *, redis: Client | None = None) -> Starlette:
    """The gateway app. With `redis` given, the caller owns that client. The route factories
    get the `Services` the lifespan fills; `app.state` shows it and the OpenAPI `Document`
    to tests and tools (the handlers never read `app.state`)."""
    services = Services(settings)
    document = Document(settings)
    routes = resources(services, document)
    document.items = [orders.CREATE_PATH, *(route.item for route in routes)]
    app = GatewayApp(
        routes=routes,
        lifespan=lifespan(services, redis),
        exception_handlers=exception_handlers(settings),
    )
    app.state.services = services
    app.state.document = document
    app.create_order = orders.create_handler(services)
    app.busy_message = settings.busy_message
    app.errors = RenderedErrors(settings.busy_message)
    app.access_log = settings.access_log
    app.clients = services.clients
    app.body_limit = settings.max_body_bytes
    app.fast_path = settings.fast_path
    app.route_names = {route.endpoint: route.path for route in routes}
    # A path with a trailing slash is a 404, not a redirect: API clients do not follow one,
    # and its Location is built from the request's Host header (a redirect anywhere).
    app.router.redirect_slashes = False
    return app


def resources(services: Services, document: Callable[[], bytes]) -> list[Resource]:
    """Every routed path, in routing order (which is also the document's)."""
    return [
        *admin.mode_routes(services),  # before /api/v1/order/{order_id}: not an order id
        *orders.routes(services),
        *payments.routes(services),
        *admin.rules_routes(services),
        *admin.sku_routes(services),
        *admin.draw_routes(services),
        *health.routes(services, document),
        *console.routes(services),
    ]


def lifespan(
    services: Services, redis: Client | None
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Build the services, connect (load every script, read the mode: `Services.connect`,
    in the background while Redis is down), run the metrics flush; undo it all at the end."""
    settings = services.settings
    scripts = ScriptRegistry()

    @contextlib.asynccontextmanager
    async def running(app: Starlette) -> AsyncIterator[None]:
        client = redis if redis is not None else create_client(settings)
        fast = create_script_client(settings)
        reader = create_reader(settings, client)
        try:
            services.start(client, scripts, fast, reader)
            await services.connect(scripts)  # Redis down: connects in the background
            flushing = asyncio.create_task(metrics.flush_every(METRICS_FLUSH_S))
            try:
                yield
            finally:
                flushing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flushing
                await services.stop()
                services.close()
        finally:
            await reader.aclose()
            if fast is not None:
                await fast.aclose()
            if redis is None:
                await client.aclose()

    return running


def exception_handlers(settings: Settings) -> dict[type[Exception], ExceptionHandler]:
    """Errors raised by Starlette's routes: a `GatewayError` by its mapping (`errors.py`),
    routing's 404 and 405 as theirs, anything else a logged 500."""
    busy = settings.busy_message

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        request.scope[ANSWER_CODE] = exc.code
        return error_response(exc, busy)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            request.scope[ANSWER_CODE] = NotFound.code
            return error_response(NotFound(), busy)
        if exc.status_code == 405:
            request.scope[ANSWER_CODE] = MethodNotAllowed.code
            return error_response(MethodNotAllowed(headers=dict(exc.headers or {})), busy)
        body = {"error": "http_error", "message": str(exc.detail)}
        return MsgspecResponse(body, status_code=exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request.scope[ANSWER_CODE] = "internal_error"
        return internal_error(request.method, request.url.path)

    return {
        GatewayError: on_gateway_error,
        HTTPException: on_http_error,
        Exception: on_unexpected,
    }


def app_from_env() -> Starlette:
    """uvicorn factory for worker processes: settings come from the environment."""
    # A worker spawned by uvicorn (--workers > 1) starts with an unconfigured root logger: the
    # INFO lines of operator changes would be lost. No-op when the root has a handler already.
    settings = Settings.from_env()
    logs.configure(settings.log_format, force=False)
    app = create_app(settings)
    settle_heap()
    # The ops reads work in threads (thousands of SKUs at a time): the event loop takes the
    # interpreter back within half a millisecond of asking, not five, so the orders it
    # serves meanwhile wait that long at most per step
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return app


def settle_heap() -> None:
    """Take what the process holds after start-up (modules, classes, the app) out of the
    cyclic garbage collector's sight. Requests in flight survive young collections and are
    promoted, so full collections come every fraction of a second under load; each scanned the
    whole start-up heap (15-50 ms measured, every one a latency spike for the requests waiting
    behind it). Frozen, a full collection scans only what was made since (`bench/`)."""
    gc.collect()
    gc.freeze()
