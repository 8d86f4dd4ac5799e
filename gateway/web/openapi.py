"""The OpenAPI 3.1 document of `GET /openapi.json`, built from the msgspec Structs the gateway
validates and encodes with (`schemas.py`, `mode.py`) and the error classes (`errors.py`), so
a field, a bound or an error code cannot change in one place only. `tests/test_openapi.py`
checks it against the OpenAPI 3.1 schema, the app's routes and `errors.py`, and schemathesis
checks the app's answers against it."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import msgspec

from gateway import __version__, errors
from gateway.errors import GatewayError
from gateway.intake.mode import ModeSwitch, ModeView
from gateway.schemas import (
    ConsoleSku,
    ConsoleView,
    ErrorBody,
    Health,
    Id,
    IdempotencyKey,
    OrderAccepted,
    OrderRequest,
    OrderTransition,
    OrderView,
    PaymentAccepted,
    PaymentConfirmation,
    Readiness,
    SkuChanges,
    SkuConfig,
    SkuView,
)
from gateway.settings import Settings
from gateway.store.keys import ORDER_ID_PATTERN
from gateway.web.protocol import HEAD_TOO_LARGE, MALFORMED, TOO_SLOW

Json = dict[str, Any]
REF = "#/components/schemas/{name}"
STRUCTS = (
    OrderRequest,
    OrderAccepted,
    OrderView,
    OrderTransition,
    PaymentConfirmation,
    PaymentAccepted,
    ModeView,
    ModeSwitch,
    SkuConfig,
    SkuView,
    SkuChanges,
    Health,
    Readiness,
    ErrorBody,
    ConsoleView,
    ConsoleSku,
)
# Fields kept as JSON in Redis and sent as is (msgspec.Raw): what their items are.
RAW_LISTS: dict[tuple[str, str], str] = {
    ("OrderView", "history"): "OrderTransition",
    ("ModeView", "history"): "ModeSwitch",
    ("ConsoleView", "history"): "ModeSwitch",
}
# Answered by the HTTP layer (`gateway/http.py`) to any request, before routing.
HTTP_LAYER: dict[int, Json] = {
    status: msgspec.json.decode(body) for status, body in (MALFORMED, TOO_SLOW, HEAD_TOO_LARGE)
}
# Answered by routing, not by an operation: a path no route matches, a method a path lacks.
ROUTING_ERRORS = (errors.NotFound, errors.MethodNotAllowed)

SHOPPER, PAYMENT, OPERATOR, HEALTH = "shopper", "payment provider", "operator", "health"
ADMIN_SECURITY: list[Json] = [{"adminToken": []}]
OVERLOAD = (errors.RateLimited, errors.BreakerOpen, errors.QueueFull, errors.BackendUnavailable)


def ref(name: str) -> Json:
    return {"$ref": REF.format(name=name)}


def _schema(type_: Any) -> Json:
    """The JSON Schema of an annotated type (no components)."""
    schema: Json = msgspec.json.schema(type_)
    return schema


def _components(settings: Settings) -> Json:
    _, schemas = msgspec.json.schema_components(STRUCTS, ref_template=REF)
    for (struct, field), item in RAW_LISTS.items():
        schemas[struct]["properties"][field] = {"type": "array", "items": ref(item)}
    # Bounds that are settings, not types.
    schemas["OrderRequest"]["properties"]["quantity"]["maximum"] = settings.max_quantity
    return dict(schemas)


def _error_schema(codes: list[str]) -> Json:
    return {"allOf": [ref("ErrorBody"), {"properties": {"error": {"enum": codes}}}]}


def _integer_header(description: str) -> Json:
    return {"description": description, "schema": {"type": "integer", "minimum": 1}}


RETRY_AFTER = _integer_header("seconds to wait before trying again")
REPLAYED = {
    "description": "`true` when this is the first answer again (same key or payment_id)",
    "schema": {"type": "string", "enum": ["true"]},
}


def _json(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def error_responses(classes: Iterable[type[GatewayError]], settings: Settings) -> Json:
    """One response per status, its `error` an enum of the codes answered with it."""
    by_status: dict[int, list[type[GatewayError]]] = {}
    for cls in classes:
        by_status.setdefault(cls.status, []).append(cls)
    out: Json = {}
    for status, group in sorted(by_status.items()):
        lines = [
            f"`{cls.code}`: {settings.busy_message if cls.overload else cls.default_message}"
            for cls in group
        ]
        response: Json = {
            "description": "; ".join(lines),
            "content": _json(_error_schema([cls.code for cls in group])),
        }
        headers: Json = {}
        if status in (429, 503):
            headers["Retry-After"] = {**RETRY_AFTER, "required": True}
        if status == 429:
            headers["RateLimit-Policy"] = {"schema": {"type": "string"}}
            headers["RateLimit"] = {"schema": {"type": "string"}}
        if errors.Unauthorized in group:
            headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
        if headers:
            response["headers"] = headers
        out[str(status)] = response
    for status, body in HTTP_LAYER.items():
        out.setdefault(
            str(status),
            {
                "description": f"`{body['error']}`: {body['message']} (the HTTP layer)",
                "content": _json(_error_schema([body["error"]])),
            },
        )
    return out


def _ok(
    status: int,
    schema: str,
    description: str,
    headers: Json | None = None,
    links: Json | None = None,
) -> Json:
    response: Json = {"description": description, "content": _json(ref(schema))}
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return {str(status): response}


# Where an answer's ids lead (OpenAPI links; schemathesis follows them in its stateful test).
ORDER_LINKS = {
    "GetOrder": {"operationId": "getOrder", "parameters": {"order_id": "$response.body#/order_id"}},
    "ConfirmPayment": {
        "operationId": "confirmPayment",
        "requestBody": {"order_id": "$response.body#/order_id"},
    },
}
SKU_LINKS = {
    "GetSku": {"operationId": "getSku", "parameters": {"sku_id": "$request.path.sku_id"}},
    "GetSkuChanges": {
        "operationId": "getSkuChanges",
        "parameters": {"sku_id": "$request.path.sku_id"},
    },
    "CreateOrder": {
        "operationId": "createOrder",
        "requestBody": {
            "sku_id": "$request.path.sku_id",
            "promotion_id": "$response.body#/promotion_id",
        },
    },
}


def _header(name: str, schema: Json, description: str, *, required: bool = False) -> Json:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": schema,
        "description": description,
    }


OPERATOR_HEADER = _header(
    "X-Operator",
    _schema(Id),
    "who makes the call (self-declared; recorded with admin changes); default `operator`",
)
SKU_ID = {
    "name": "sku_id",
    "in": "path",
    "required": True,
    "schema": _schema(Id),
    "example": "sku-42",
}
ORDER_ID_EXAMPLE = "x3kq7m2a4b6c5d2e4f6g7h2j3n.sku-42"


def _admin(op: Json, *extra: type[GatewayError], settings: Settings) -> Json:
    """An operator endpoint: bearer token, optional X-Operator, the errors every one has."""
    classes: tuple[type[GatewayError], ...] = (
        errors.InvalidRequest,
        errors.Unauthorized,
        *extra,
        errors.AdminDisabled,
        errors.BackendUnavailable,
    )
    op["tags"] = [OPERATOR]
    op["security"] = ADMIN_SECURITY
    op["parameters"] = [*op.get("parameters", []), OPERATOR_HEADER]
    op["responses"] = {**op["responses"], **error_responses(classes, settings)}
    return op


def _body(schema: str, example: Json) -> Json:
    return {
        "required": True,
        "content": {"application/json": {"schema": ref(schema), "example": example}},
    }


def _paths(settings: Settings) -> Json:
    def errs(*classes: type[GatewayError]) -> Json:
        return error_responses(classes, settings)

    create = {
        "tags": [SHOPPER],
        "operationId": "createOrder",
        "summary": "Hold stock for one order (NORMAL) or queue it (QUEUE_ONLY)",
        "description": (
            "The same user, key and request again answers the first `202` byte for byte with "
            "`Idempotent-Replayed: true`. The key may also be sent as `Idempotency-Key`, and "
            'quoted (`"<uuid>"`). Content-Type is not enforced.'
        ),
        "parameters": [
            _header(
                "X-Idempotency-Key",
                _schema(IdempotencyKey),
                "a UUID (v4 expected); scope: the user",
                required=True,
            )
            | {"example": "3f2b8c1e-9d4a-4c6b-8e2f-1a7d5c9b0e34"}
        ],
        "requestBody": _body(
            "OrderRequest",
            {"user_id": "u123", "sku_id": "sku-42", "quantity": 1, "promotion_id": "promo-1111"},
        ),
        "responses": {
            **_ok(
                202,
                "OrderAccepted",
                "held or queued",
                {"Idempotent-Replayed": REPLAYED},
                ORDER_LINKS,
            ),
            **errs(
                errors.InvalidRequest,
                errors.SaleNotActive,
                errors.UnknownSku,
                errors.SoldOut,
                errors.LimitExceeded,
                errors.KeyInUse,
                errors.PayloadTooLarge,
                errors.KeyReused,
                *OVERLOAD,
            ),
        },
    }
    get_order = {
        "tags": [SHOPPER],
        "operationId": "getOrder",
        "summary": "An order's status and history",
        "parameters": [
            {
                "name": "order_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": ORDER_ID_PATTERN},
                "example": ORDER_ID_EXAMPLE,
            }
        ],
        "responses": {
            **_ok(200, "OrderView", "the order"),
            **errs(errors.UnknownOrder, errors.NotFound, errors.BackendUnavailable),
        },
    }
    confirm = {
        "tags": [PAYMENT],
        "operationId": "confirmPayment",
        "summary": "Record a payment; a finalizer then confirms the order",
        "security": [{"paymentSignature": []}],
        "requestBody": _body(
            "PaymentConfirmation", {"order_id": ORDER_ID_EXAMPLE, "payment_id": "pay-7781"}
        ),
        "responses": {
            **_ok(
                202,
                "PaymentAccepted",
                "recorded",
                {"Idempotent-Replayed": REPLAYED},
                {"GetOrder": ORDER_LINKS["GetOrder"]},
            ),
            **errs(
                errors.InvalidRequest,
                errors.BadSignature,
                errors.UnknownOrder,
                errors.PaymentReused,
                errors.PayloadTooLarge,
                errors.PaymentsDisabled,
                errors.BackendUnavailable,
            ),
        },
    }
    get_switch = {
        "operationId": "getMode",
        "summary": "The intake mode and its last 20 switches, newest first",
        "responses": _ok(200, "ModeView", "the mode"),
    }
    post_switch = {
        "operationId": "switchMode",
        "summary": "Switch the intake mode; every gateway applies it within 1 s",
        "parameters": [
            {
                "name": "mode",
                "in": "query",
                "required": True,
                "schema": {"type": "string", "enum": ["QUEUE_ONLY", "NORMAL"]},
            }
        ],
        "responses": _ok(200, "ModeView", "the mode after the switch"),
    }
    put_sku = {
        "operationId": "configureSku",
        "summary": "Create or change a SKU; the change is recorded in its change log",
        "parameters": [SKU_ID],
        "requestBody": _body(
            "SkuConfig", {"promotion_id": "promo-1111", "stock": 100, "per_user_limit": 2}
        ),
        "responses": {
            **_ok(200, "SkuView", "updated", links=SKU_LINKS),
            **_ok(201, "SkuView", "created", links=SKU_LINKS),
        },
    }
    get_sku = {
        "operationId": "getSku",
        "summary": "A SKU's figures: stock == available + held + sold",
        "parameters": [SKU_ID],
        "responses": _ok(200, "SkuView", "the SKU"),
    }
    changes = {
        "operationId": "getSkuChanges",
        "summary": "A SKU's configuration changes, newest first",
        "parameters": [
            SKU_ID,
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            },
        ],
        "responses": _ok(200, "SkuChanges", "the changes"),
    }
    health = {
        "tags": [HEALTH],
        "operationId": "healthz",
        "summary": "The process runs (never touches Redis)",
        "responses": {**_ok(200, "Health", "alive"), **errs()},
    }
    ready = {
        "tags": [HEALTH],
        "operationId": "readyz",
        "summary": "Redis answers and every script is loaded",
        "responses": {
            **_ok(200, "Readiness", "ready"),
            **errs(errors.BackendUnavailable),
        },
    }
    console_view = {
        "operationId": "getConsoleView",
        "summary": "What the ops console shows: mode, switches, this worker's breaker, SKUs",
        "responses": _ok(200, "ConsoleView", "the console's figures"),
    }

    def unversioned(operation_id: str, summary: str, description: str, content: Json) -> Json:
        """An endpoint outside /api/v1 that answers 200 with `content` or the common errors."""
        return {
            "tags": [HEALTH],
            "operationId": operation_id,
            "summary": summary,
            "responses": {"200": {"description": description, "content": content}, **errs()},
        }

    text = {"schema": {"type": "string"}}
    console_page = unversioned(
        "console",
        "The ops console page (asks for the admin token; no data of its own)",
        "HTML",
        {"text/html": text},
    )
    prometheus = unversioned(
        "metrics",
        "Prometheus text: every worker's counts and what Redis holds now",
        "Prometheus text exposition format",
        {"text/plain": text},
    )
    document = unversioned("openapi", "This document", "OpenAPI 3.1", _json({"type": "object"}))
    return {
        "/api/v1/order/create": {"post": create},
        "/api/v1/order/switch": {
            "get": _admin(get_switch, settings=settings),
            "post": _admin(post_switch, settings=settings),
        },
        "/api/v1/order/{order_id}": {"get": get_order},
        "/api/v1/payment/confirm": {"post": confirm},
        "/api/v1/admin/skus/{sku_id}": {
            "put": _admin(
                put_sku,
                errors.StockBelowCommitted,
                errors.BucketsFixed,
                errors.PayloadTooLarge,
                settings=settings,
            ),
            "get": _admin(get_sku, errors.UnknownSku, settings=settings),
        },
        "/api/v1/admin/skus/{sku_id}/changes": {
            "get": _admin(changes, errors.UnknownSku, settings=settings),
        },
        "/healthz": {"get": health},
        "/readyz": {"get": ready},
        "/openapi.json": {"get": document},
        "/metrics": {"get": prometheus},
        "/console": {"get": console_page},
        "/api/v1/admin/console": {"get": _admin(console_view, settings=settings)},
    }


def _ecma_patterns(node: Any) -> None:
    """Python's end-of-string `\\Z` is ECMA-262's `$` (JSON Schema regexes have no multiline)."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("\\Z"):
            node["pattern"] = pattern[:-2] + "$"
        for value in node.values():
            _ecma_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _ecma_patterns(value)


def build(settings: Settings) -> Json:
    """The document as a dict."""
    doc: Json = {
        "openapi": "3.1.0",
        "info": {
            "title": "flashgate",
            "version": __version__,
            "description": (
                "Flash-sale intake gateway. Every non-2xx answer is "
                '`{"error": CODE, "message": TEXT}`, sometimes with a detail field. '
                "Every 429 and 503 carries `Retry-After`. Routing answers "
                + ", ".join(f"`{cls.status} {cls.code}`" for cls in ROUTING_ERRORS)
                + " for a path or method not listed here. Integers are JSON integers: `1.0` "
                "or `1e0` is `400 invalid_request` (JSON Schema would call them integers). "
                "Unknown body fields are refused."
            ),
        },
        "tags": [{"name": name} for name in (SHOPPER, PAYMENT, OPERATOR, HEALTH)],
        "paths": _paths(settings),
        "components": {
            "schemas": _components(settings),
            "responses": {
                cls.__name__: {
                    "description": f"`{cls.code}`: {cls.default_message}",
                    "content": _json(_error_schema([cls.code])),
                }
                for cls in ROUTING_ERRORS
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "FLASHGATE_ADMIN_TOKEN; unset: `503 admin_disabled`",
                },
                "paymentSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Signature",
                    "description": (
                        "hex HMAC-SHA256 of the raw body with FLASHGATE_PAYMENT_SECRET; "
                        "unset: `503 payments_disabled`"
                    ),
                },
            },
        },
    }
    doc = copy.deepcopy(doc)  # shared dicts (SKU_ID, headers) become separate nodes
    _ecma_patterns(doc)
    return doc


def render(settings: Settings) -> bytes:
    """The document as JSON bytes, built once per app (`Gateway.openapi`)."""
    return msgspec.json.encode(build(settings))
