"""The OpenAPI 3.1 document of `GET /openapi.json`, built from the route declarations
(`routing.Operation`: body, answers, raised errors), the msgspec Structs the gateway
validates and encodes with (`schemas.py`, `mode.py`) and the error classes (`errors.py`), so
a route, a field, a bound or an error code cannot change in one place only. `tests/test_openapi.py`
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
from gateway.intake.rules import RuleChange, Rules, RulesPatch, RulesView
from gateway.schemas import (
    ConsoleSku,
    ConsoleView,
    ErrorBody,
    Health,
    Id,
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
from gateway.web.protocol import HEAD_TOO_LARGE, MALFORMED, TOO_SLOW
from gateway.web.routing import (
    ADMIN,
    HEALTH,
    OPERATOR,
    PAYMENT,
    SHOPPER,
    SIGNATURE,
    Answer,
    Json,
    Operation,
    PathItem,
    header_parameter,
    schema_of,
)

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
    Rules,
    RulesPatch,
    RulesView,
    RuleChange,
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
# Answered by the HTTP layer (`web/protocol.py`) to any request, before routing.
HTTP_LAYER: dict[int, Json] = {
    status: msgspec.json.decode(body) for status, body in (MALFORMED, TOO_SLOW, HEAD_TOO_LARGE)
}
# Answered by routing, not by an operation: a path no route matches, a method a path lacks.
ROUTING_ERRORS = (errors.NotFound, errors.MethodNotAllowed)

ADMIN_SECURITY: list[Json] = [{ADMIN: []}]
OPERATOR_HEADER = header_parameter(
    "X-Operator",
    schema_of(Id),
    "who makes the call (self-declared; recorded with admin changes); default `operator`",
)


def ref(name: str) -> Json:
    return {"$ref": REF.format(name=name)}


def _components(settings: Settings) -> Json:
    _, schemas = msgspec.json.schema_components(STRUCTS, ref_template=REF)
    for (struct, field), item in RAW_LISTS.items():
        schemas[struct]["properties"][field] = {"type": "array", "items": ref(item)}
    # Bounds that are settings, not types.
    schemas["OrderRequest"]["properties"]["quantity"]["maximum"] = settings.max_quantity
    return dict(schemas)


def _error_schema(codes: list[str]) -> Json:
    return {"allOf": [ref("ErrorBody"), {"properties": {"error": {"enum": codes}}}]}


RETRY_AFTER = {
    "description": "seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 1},
    "required": True,
}


def _json(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def error_responses(classes: Iterable[type[GatewayError]], settings: Settings) -> Json:
    """One response per status, its `error` an enum of the codes answered with it, then the
    HTTP layer's answers to any request."""
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
        if status in errors.RETRY_AFTER_STATUSES:
            headers["Retry-After"] = RETRY_AFTER
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


def _answers(answers: Iterable[Answer]) -> Json:
    out: Json = {}
    for answer in answers:
        schema = ref(answer.body.__name__) if isinstance(answer.body, type) else answer.body
        response: Json = {
            "description": answer.description,
            "content": {answer.media_type: {"schema": schema}},
        }
        if answer.headers:
            response["headers"] = answer.headers
        if answer.links:
            response["links"] = answer.links
        out[str(answer.status)] = response
    return out


def operation(op: Operation, settings: Settings) -> Json:
    """One operation object. An operator endpoint (`security=ADMIN`) has its tag, security
    and `X-Operator` parameter after its responses."""
    admin = op.security == ADMIN
    out: Json = {} if admin else {"tags": [op.tag]}
    out["operationId"] = op.operation_id
    out["summary"] = op.summary
    if op.description:
        out["description"] = op.description
    if op.security and not admin:
        out["security"] = [{op.security: []}]
    if op.parameters:
        out["parameters"] = [*op.parameters, *([OPERATOR_HEADER] if admin else [])]
    if op.body is not None:
        content = {"schema": ref(op.body.__name__), "example": op.example}
        out["requestBody"] = {"required": True, "content": {"application/json": content}}
    out["responses"] = {**_answers(op.answers), **error_responses(op.raises, settings)}
    if admin:
        out["tags"] = [OPERATOR]
        out["security"] = ADMIN_SECURITY
        out.setdefault("parameters", [OPERATOR_HEADER])
    return out


def _paths(items: Iterable[PathItem], settings: Settings) -> Json:
    return {
        item.path: {op.method.lower(): operation(op, settings) for op in item.operations}
        for item in items
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


def build(settings: Settings, items: Iterable[PathItem]) -> Json:
    """The document of the declared paths (`routing.PathItem`), in their order, as a dict."""
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
        "paths": _paths(items, settings),
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
                ADMIN: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "FLASHGATE_ADMIN_TOKEN; unset: `503 admin_disabled`",
                },
                SIGNATURE: {
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


def render(settings: Settings, items: Iterable[PathItem]) -> bytes:
    """The document as JSON bytes."""
    return msgspec.json.encode(build(settings, items))


class Document:
    """The document an app serves: built from its declared paths on first use, then the
    same bytes. `items` is set by `create_app` once every route exists (the document's own
    route among them)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items: list[PathItem] = []
        self._bytes: bytes | None = None

    def build(self) -> Json:
        return build(self.settings, self.items)

    def __call__(self) -> bytes:
        if self._bytes is None:
            self._bytes = render(self.settings, self.items)
        return self._bytes
