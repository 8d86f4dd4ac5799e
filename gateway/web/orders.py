"""Orders: create (the flood's path, a bare ASGI handler that `front.GatewayApp` serves in
front of Starlette) and the order lookup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from gateway import errors
from gateway.schemas import (
    IdempotencyKey,
    OrderAccepted,
    OrderRequest,
    OrderView,
    order_request_decoder,
    parse_idempotency_key,
)
from gateway.store.keys import ORDER_ID_PATTERN
from gateway.store.outcomes import CreateResult
from gateway.web.bodies import decode, header
from gateway.web.responses import MsgspecResponse
from gateway.web.routing import (
    REPLAYED,
    SHOPPER,
    Answer,
    Operation,
    PathItem,
    Resource,
    header_parameter,
    schema_of,
)
from gateway.web.services import Services

ORDER_PATH = "/api/v1/order/create"
ORDER_ID_EXAMPLE = "x3kq7m2a4b6c5d2e4f6g7h2j3n.sku-42"
OVERLOAD = (errors.RateLimited, errors.BreakerOpen, errors.QueueFull, errors.BackendUnavailable)
# Where an answer's ids lead (OpenAPI links; schemathesis follows them in its stateful test).
ORDER_LINKS = {
    "GetOrder": {"operationId": "getOrder", "parameters": {"order_id": "$response.body#/order_id"}},
    "ConfirmPayment": {
        "operationId": "confirmPayment",
        "requestBody": {"order_id": "$response.body#/order_id"},
    },
}

CREATE = Operation(
    method="POST",
    tag=SHOPPER,
    operation_id="createOrder",
    summary="Hold stock for one order (NORMAL) or queue it (QUEUE_ONLY)",
    description=(
        "The same user, key and request again answers the first `202` byte for byte with "
        "`Idempotent-Replayed: true`. The key may also be sent as `Idempotency-Key`, and "
        'quoted (`"<uuid>"`). Content-Type is not enforced.'
    ),
    parameters=(
        header_parameter(
            "X-Idempotency-Key",
            schema_of(IdempotencyKey),
            "a UUID (v4 expected); scope: the user",
            required=True,
        )
        | {"example": "3f2b8c1e-9d4a-4c6b-8e2f-1a7d5c9b0e34"},
    ),
    body=OrderRequest,
    example={"user_id": "u123", "sku_id": "sku-42", "quantity": 1, "promotion_id": "promo-1111"},
    answers=(
        Answer(
            status=202,
            body=OrderAccepted,
            description="held, queued, or pre-queued for a fair start (`opens_at`)",
            headers={"Idempotent-Replayed": REPLAYED},
            links=ORDER_LINKS,
        ),
    ),
    raises=(
        errors.InvalidRequest,
        errors.SaleNotActive,
        errors.UnknownSku,
        errors.SoldOut,
        errors.LimitExceeded,
        errors.KeyInUse,
        errors.PayloadTooLarge,
        errors.KeyReused,
        errors.ClientRateLimited,
        *OVERLOAD,
    ),
)
CREATE_PATH = PathItem(ORDER_PATH, (CREATE,))  # served by `front.GatewayApp`, not routed

RETRY_AFTER_QUEUED = {  # the answer header of a QUEUED order
    "description": "`QUEUED` orders only: `queue.poll_after_s`, whole seconds to wait",
    "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}

GET_ORDER = Operation(
    method="GET",
    tag=SHOPPER,
    operation_id="getOrder",
    summary="An order's status and history",
    parameters=(
        {
            "name": "order_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": ORDER_ID_PATTERN},
            "example": ORDER_ID_EXAMPLE,
        },
    ),
    description=(
        "A `QUEUED` order also carries `queue`: its position in its SKU's queue (never "
        "increases), the ETA (`null` while the drain rate is unknown) and `poll_after_s`, "
        "which `Retry-After` repeats: ask again no sooner. See the Shoppers' view page. "
        "An order pre-queued for a fair start also carries `opens_at`; until its SKU's draw "
        "has ranked it, `queue.position` and `queue.eta_s` are `null` and `poll_after_s` "
        "runs to the sale's start (at most 30 s). See the Fair start page."
    ),
    answers=(
        Answer(
            status=200,
            body=OrderView,
            description="the order",
            headers={"Retry-After": RETRY_AFTER_QUEUED},
        ),
    ),
    raises=(errors.UnknownOrder, errors.NotFound, errors.BackendUnavailable),
)

OrderHandler = Callable[[list[tuple[bytes, bytes]], bytes, Scope], Awaitable[tuple[bytes, bool]]]


def create_handler(services: Services) -> OrderHandler:
    """`POST /api/v1/order/create`: the request's headers (lower-case names) and body in, and
    the scope for the client's address (its `client` and `headers`); out the `202` body and
    whether it is a replay (`front.GatewayApp` answers it; a refusal raises its
    `GatewayError`). The body is read by the caller, within the size limit."""
    max_quantity = services.settings.max_quantity
    clients = services.clients

    async def create_order(
        headers: list[tuple[bytes, bytes]], body: bytes, scope: Scope
    ) -> tuple[bytes, bool]:
        req = decode(order_request_decoder, body)
        if req.quantity > max_quantity:
            raise errors.InvalidRequest(f"quantity must be <= {max_quantity} - at `$.quantity`")
        raw_key = header(headers, b"x-idempotency-key")
        if raw_key is None:
            raw_key = header(headers, b"idempotency-key")
        try:
            key = parse_idempotency_key(None if raw_key is None else raw_key.decode("latin-1"))
        except msgspec.ValidationError as exc:
            raise errors.InvalidRequest(str(exc)) from None

        intake = services.intake
        client = clients.of(scope) if intake.keyed.on else ""  # only the client limit needs it
        result, payload = await intake.create(req, key, client)
        return payload, result is CreateResult.REPLAYED

    return create_order


def routes(services: Services) -> list[Resource]:
    async def get_order(request: Request) -> Response:
        order = await services.inventory.get_order(request.path_params["order_id"])
        if order is None:
            raise errors.UnknownOrder()
        if order.queue is not None:  # poll no sooner than the queue says
            return MsgspecResponse(order, headers={"Retry-After": str(order.queue.poll_after_s)})
        return MsgspecResponse(order)

    return [Resource("/api/v1/order/{order_id}", (GET_ORDER, get_order))]
