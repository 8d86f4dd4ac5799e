"""Thin handlers: decode -> inventory -> encode. Validation happens before any Redis work."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope

from gateway import errors
from gateway.intake.mode import Mode
from gateway.ops import status
from gateway.schemas import (
    ConsoleSku,
    ConsoleView,
    Health,
    PaymentAccepted,
    Readiness,
    SkuChanges,
    order_request_decoder,
    parse_idempotency_key,
    payment_decoder,
    sku_config_decoder,
)
from gateway.store.inventory import ConfigureResult, PaymentResult
from gateway.store.keys import ID_PATTERN
from gateway.telemetry import metrics
from gateway.transport.client import call
from gateway.web.operators import Operator, client_address, log_change, operator_of
from gateway.web.responses import MsgspecResponse, RawJSONResponse

if TYPE_CHECKING:
    from gateway.web.app import Gateway

T = TypeVar("T")
_ID = re.compile(ID_PATTERN)
_REPLAYED = {"Idempotent-Replayed": "true"}
CHANGES_SHOWN_MAX = 100  # most change-log entries one GET returns


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def read_body(receive: Receive, declared: bytes | str | None, limit: int) -> bytes:
    """The request body, refused with 413 once it is larger than `limit` bytes. `declared` is
    the Content-Length header, checked first so an oversized body is not even read."""
    if declared is not None:
        try:
            too_large = int(declared) > limit
        except ValueError:
            raise errors.InvalidRequest("Content-Length is not a number") from None
        if too_large:
            raise errors.PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise errors.InvalidRequest("client disconnected before sending the body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body is larger than {limit} bytes")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def request_body(request: Request, limit: int) -> bytes:
    return await read_body(request.receive, request.headers.get("content-length"), limit)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode and validate a body; every failure is `400 invalid_request` naming the field."""
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError included: it is a subclass
        raise errors.InvalidRequest(str(exc)) from None
    except UnicodeDecodeError:
        raise errors.InvalidRequest("request body is not valid UTF-8") from None


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """One request header from the ASGI scope (names arrive lower-case)."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def create_order(gw: Gateway, scope: Scope, receive: Receive) -> Response:
    """POST /api/v1/order/create, served as a bare ASGI handler (see `app.GatewayApp`)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    body = await read_body(receive, header(headers, b"content-length"), gw.settings.max_body_bytes)
    req = decode(order_request_decoder, body)
    if req.quantity > gw.settings.max_quantity:
        raise errors.InvalidRequest(
            f"quantity must be <= {gw.settings.max_quantity} - at `$.quantity`"
        )
    raw_key = header(headers, b"x-idempotency-key")
    if raw_key is None:
        raw_key = header(headers, b"idempotency-key")
    try:
        key = parse_idempotency_key(None if raw_key is None else raw_key.decode("latin-1"))
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(str(exc)) from None

    replayed, payload = await gw.intake.create(req, key)
    if replayed:
        return RawJSONResponse(payload, status_code=202, headers=_REPLAYED)
    return RawJSONResponse(payload, status_code=202)


async def get_order(request: Request) -> Response:
    gw = _gateway(request)
    order = await gw.inventory.get_order(request.path_params["order_id"])
    if order is None:
        raise errors.UnknownOrder()
    return MsgspecResponse(order)


async def confirm_payment(request: Request) -> Response:
    """Payment provider callback: signature over the raw body first, then the body."""
    gw = _gateway(request)
    secret = gw.settings.payment_secret
    if not secret:
        raise errors.PaymentsDisabled()
    body = await request_body(request, gw.settings.max_body_bytes)
    given = request.headers.get("x-signature", "").strip().lower()
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
        gw.signature_refusals.refused(client_address(request.scope))
        raise errors.BadSignature()
    pay = decode(payment_decoder, body)
    result = await gw.inventory.confirm_payment(pay.order_id, pay.payment_id)
    if result is PaymentResult.UNKNOWN_ORDER:
        raise errors.UnknownOrder()
    if result is PaymentResult.PAYMENT_REUSED:
        raise errors.PaymentReused()
    answer = PaymentAccepted(order_id=pay.order_id, payment_id=pay.payment_id, accepted=True)
    headers = _REPLAYED if result is PaymentResult.REPLAYED else None
    return MsgspecResponse(answer, status_code=202, headers=headers)


def require_admin(request: Request, gw: Gateway) -> Operator:
    """Bearer token check in constant time; admin is off (503) when no token is set. Returns
    who is calling (`X-Operator`, self-declared, and the peer address); a malformed
    `X-Operator` is `400`, after the token check."""
    token = gw.settings.admin_token
    if not token:
        raise errors.AdminDisabled()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )
    if not ok:
        gw.admin_refusals.refused(client_address(request.scope))
        raise errors.Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="flashgate"'})
    return operator_of(request)


def _sku_id(request: Request) -> str:
    sku_id: str = request.path_params["sku_id"]
    if not _ID.match(sku_id):
        raise errors.InvalidRequest("sku_id must be 1-64 characters of [A-Za-z0-9_.:-]")
    return sku_id


async def put_sku(request: Request) -> Response:
    gw = _gateway(request)
    op = require_admin(request, gw)
    sku_id = _sku_id(request)
    body = await request_body(request, gw.settings.max_body_bytes)
    cfg = decode(sku_config_decoder, body)
    if cfg.starts_at is not None and cfg.ends_at is not None and cfg.ends_at <= cfg.starts_at:
        raise errors.InvalidRequest("ends_at must be after starts_at")
    result, committed = await gw.inventory.configure_sku(sku_id, cfg, by=op.name, client=op.client)
    if result is ConfigureResult.STOCK_BELOW_COMMITTED:
        raise errors.StockBelowCommitted(committed=committed)
    if result is ConfigureResult.BUCKETS_FIXED:
        raise errors.BucketsFixed(buckets=committed)
    created = result is ConfigureResult.CREATED
    log_change(
        op,
        f"sku {sku_id} {'created' if created else 'updated'}:",
        promotion_id=cfg.promotion_id,
        stock=cfg.stock,
        per_user_limit=cfg.per_user_limit,
        starts_at=cfg.starts_at,
        ends_at=cfg.ends_at,
        **({"buckets": cfg.buckets} if cfg.buckets > 1 else {}),
    )
    view = await gw.inventory.get_sku(sku_id)
    return MsgspecResponse(view, status_code=201 if created else 200)


async def get_sku(request: Request) -> Response:
    gw = _gateway(request)
    require_admin(request, gw)
    view = await gw.inventory.get_sku(_sku_id(request))
    if view is None:
        raise errors.UnknownSku("no such SKU")
    return MsgspecResponse(view)


_LIMIT = re.compile(r"^[0-9]{1,3}\Z")


async def get_sku_changes(request: Request) -> Response:
    """The SKU's configuration changes, newest first: `?limit=` 1-100, default 20."""
    gw = _gateway(request)
    require_admin(request, gw)
    sku_id = _sku_id(request)
    raw = request.query_params.get("limit", "20")
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= CHANGES_SHOWN_MAX:
        raise errors.InvalidRequest(f"limit must be an integer from 1 to {CHANGES_SHOWN_MAX}")
    changes = await gw.inventory.sku_changes(sku_id, int(raw))
    if changes is None:
        raise errors.UnknownSku("no such SKU")
    return MsgspecResponse(SkuChanges(sku_id=sku_id, changes=changes))


_HEALTHY = Health(status="ok")


async def healthz(request: Request) -> Response:
    return MsgspecResponse(_HEALTHY)


async def readyz(request: Request) -> Response:
    gw = _gateway(request)
    if await gw.inventory.ping():
        return MsgspecResponse(Readiness(status="ready", mode=gw.watcher.mode, pid=os.getpid()))
    raise errors.BackendUnavailable(reason="Redis is not answering or scripts are not loaded")


async def get_switch(request: Request) -> Response:
    gw = _gateway(request)
    require_admin(request, gw)
    return MsgspecResponse(await call(gw.modes.view()))


async def post_switch(request: Request) -> Response:
    gw = _gateway(request)
    op = require_admin(request, gw)
    raw = request.query_params.get("mode", "")
    try:
        mode = Mode(raw.strip().upper())
    except ValueError:
        raise errors.InvalidRequest("mode must be QUEUE_ONLY or NORMAL - at `?mode`") from None
    changed = await call(gw.modes.switch(mode, by=op.name, client=op.client))
    if changed:  # two modes: a change comes from the other one
        other = Mode.NORMAL if mode is Mode.QUEUE_ONLY else Mode.QUEUE_ONLY
        log_change(op, "mode switched:", previous=other.value, mode=mode.value)
    else:
        log_change(op, "mode switch (already in force, nothing changed):", mode=mode.value)
    gw.watcher.mode = mode  # this process at once; the others on the published notice
    return MsgspecResponse(await call(gw.modes.view()))


async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 document (`gateway/openapi.py`), built once; no auth."""
    return RawJSONResponse(_gateway(request).openapi())


Endpoint = Callable[[Request], Awaitable[Response]]


def resource(path: str, **handlers: Endpoint) -> Route:
    """One route per path whatever its methods, so that a 405 lists all of them in `Allow`:
    Starlette answers with the methods of the first route whose path matched."""
    if len(handlers) == 1:
        ((method, endpoint),) = handlers.items()
        return Route(path, endpoint, methods=[method])

    async def by_method(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, by_method, methods=list(handlers))


_CONSOLE_PAGE = (resources.files("gateway.web") / "console.html").read_bytes()
_CONSOLE_HEADERS = {
    # the page's own script and styles only; data comes from this origin with the token
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


async def console_page(request: Request) -> Response:
    """The ops console (gateway/console.html): a page with no data of its own; it asks for
    the admin token and reads `/api/v1/admin/console` with it every second."""
    return Response(_CONSOLE_PAGE, media_type="text/html", headers=_CONSOLE_HEADERS)


async def console_view(request: Request) -> Response:
    gw = _gateway(request)
    require_admin(request, gw)
    sample = await call(status.sample(gw.inventory.redis))
    modes = await call(gw.modes.view(limit=10))
    view = ConsoleView(
        mode=modes.mode.value,
        changed_at=modes.changed_at,
        history=modes.history,
        breaker=gw.breaker.state.value,
        entries_in=sum(s.entries_in for s in sample.skus),
        skus=[
            ConsoleSku(
                sku_id=s.sku_id,
                stock=s.stock,
                available=s.available,
                held=s.held,
                sold=s.sold,
                holds=s.holds,
                backlog=s.backlog,
                pending=s.pending,
                dead=s.dead,
            )  # fmt: skip
            for s in sample.skus
        ],
    )
    return MsgspecResponse(view)


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text: every worker's counts and what Redis holds (gateway/metrics.py)."""
    gw = _gateway(request)
    body = await metrics.render(gw.inventory.redis)
    return Response(body, media_type=metrics.CONTENT_TYPE)


routes = [
    resource("/api/v1/order/switch", GET=get_switch, POST=post_switch),
    resource("/api/v1/order/{order_id}", GET=get_order),
    resource("/api/v1/payment/confirm", POST=confirm_payment),
    resource("/api/v1/admin/skus/{sku_id}", GET=get_sku, PUT=put_sku),
    resource("/api/v1/admin/skus/{sku_id}/changes", GET=get_sku_changes),
    resource("/healthz", GET=healthz),
    resource("/readyz", GET=readyz),
    resource("/openapi.json", GET=openapi_document),
    resource("/metrics", GET=metrics_endpoint),
    resource("/console", GET=console_page),
    resource("/api/v1/admin/console", GET=console_view),
]
