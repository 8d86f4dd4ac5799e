"""Route declarations: what each operation reads, answers and raises, beside its handler.

An `Operation` is the documentation of one method on one path: its request body type, its
success answers (status, schema, headers) and the `GatewayError` classes it raises. A
`Resource` is the Starlette route of one path, serving its operations with their handlers;
`openapi.py` builds the document from these declarations alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import GatewayError

Json = dict[str, Any]
Handler = Callable[[Request], Awaitable[Response]]

# The document's tags; operator endpoints are tagged by their security (`ADMIN`).
SHOPPER, PAYMENT, OPERATOR, HEALTH = "shopper", "payment provider", "operator", "health"
ADMIN, SIGNATURE = "adminToken", "paymentSignature"  # security schemes


def schema_of(type_: Any) -> Json:
    """The JSON Schema of an annotated type (no components)."""
    schema: Json = msgspec.json.schema(type_)
    return schema


def header_parameter(name: str, schema: Json, description: str, *, required: bool = False) -> Json:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": schema,
        "description": description,
    }


REPLAYED = {  # the answer header of an idempotent replay
    "description": "`true` when this is the first answer again (same key or payment_id)",
    "schema": {"type": "string", "enum": ["true"]},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """A success answer. `body` is a Struct (documented as a reference to its schema) or an
    inline JSON Schema; `headers` and `links` are OpenAPI objects by name."""

    status: int
    description: str
    body: type | Json
    media_type: str = "application/json"
    headers: Json | None = None
    links: Json | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One method of one path, as the document shows it. `raises` lists every error the
    handler can answer with (the HTTP layer's own answers are added by `openapi.py`)."""

    method: str
    operation_id: str
    summary: str
    answers: tuple[Answer, ...]
    raises: tuple[type[GatewayError], ...] = ()
    tag: str = ""  # none for an operator endpoint (`security=ADMIN` tags it)
    security: str = ""
    description: str = ""
    parameters: tuple[Json, ...] = ()
    body: type | None = None  # the request body's Struct (required when set)
    example: Json = field(default_factory=dict)  # of the request body


@dataclass(frozen=True, slots=True)
class PathItem:
    """A path and its operations, in the document's order."""

    path: str
    operations: tuple[Operation, ...]


class Resource(Route):
    """The one Starlette route of a path, whatever its methods, so that a 405 lists all of
    them in `Allow` (Starlette answers with the methods of the first route whose path
    matched). `served` pairs each operation with its handler, in the document's order."""

    def __init__(self, path: str, *served: tuple[Operation, Handler]) -> None:
        self.item = PathItem(path, tuple(op for op, _ in served))
        handlers = {op.method: handler for op, handler in served}
        endpoint = served[0][1] if len(served) == 1 else _by_method(handlers)
        super().__init__(path, endpoint, methods=sorted(handlers))


def _by_method(handlers: dict[str, Handler]) -> Handler:
    async def by_method(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return by_method
