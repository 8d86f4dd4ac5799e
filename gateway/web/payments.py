"""The payment provider's callback: a signed payment confirmation."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import Response

from gateway import errors
from gateway.schemas import PaymentAccepted, PaymentConfirmation, payment_decoder
from gateway.store.outcomes import PaymentResult
from gateway.web.bodies import decode, request_body
from gateway.web.operators import client_address
from gateway.web.orders import ORDER_ID_EXAMPLE, ORDER_LINKS
from gateway.web.responses import REPLAYED_HEADERS, MsgspecResponse
from gateway.web.routing import PAYMENT, REPLAYED, SIGNATURE, Answer, Operation, Resource
from gateway.web.services import Services

CONFIRM = Operation(
    method="POST",
    tag=PAYMENT,
    operation_id="confirmPayment",
    summary="Record a payment; a finalizer then confirms the order",
    security=SIGNATURE,
    body=PaymentConfirmation,
    example={"order_id": ORDER_ID_EXAMPLE, "payment_id": "pay-7781"},
    answers=(
        Answer(
            status=202,
            body=PaymentAccepted,
            description="recorded",
            headers={"Idempotent-Replayed": REPLAYED},
            links={"GetOrder": ORDER_LINKS["GetOrder"]},
        ),
    ),
    raises=(
        errors.InvalidRequest,
        errors.BadSignature,
        errors.UnknownOrder,
        errors.PaymentReused,
        errors.PayloadTooLarge,
        errors.PaymentsDisabled,
        errors.BackendUnavailable,
    ),
)


def routes(services: Services) -> list[Resource]:
    settings = services.settings

    async def confirm_payment(request: Request) -> Response:
        """Payment provider callback: signature over the raw body first, then the body."""
        secret = settings.payment_secret
        if not secret:
            raise errors.PaymentsDisabled()
        body = await request_body(request, settings.max_body_bytes)
        given = request.headers.get("x-signature", "").strip().lower()
        expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
            services.signature_refusals.refused(client_address(request.scope))
            raise errors.BadSignature()
        pay = decode(payment_decoder, body)
        result = await services.inventory.confirm_payment(pay.order_id, pay.payment_id)
        if result is PaymentResult.UNKNOWN_ORDER:
            raise errors.UnknownOrder()
        if result is PaymentResult.PAYMENT_REUSED:
            raise errors.PaymentReused()
        answer = PaymentAccepted(order_id=pay.order_id, payment_id=pay.payment_id, accepted=True)
        headers = REPLAYED_HEADERS if result is PaymentResult.REPLAYED else None
        return MsgspecResponse(answer, status_code=202, headers=headers)

    return [Resource("/api/v1/payment/confirm", (CONFIRM, confirm_payment))]
