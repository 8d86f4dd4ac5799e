"""The error hierarchy and, beside it, the single error -> HTTP mapping: the status is the
class's, the body `{"error": CODE, "message": TEXT, ...detail}` (`error_body`), the headers
the error's own plus Retry-After on every 429 and 503 (`error_headers`). The web layer only
turns these into a response; intake and store raise the errors and know no HTTP."""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Root of every error the gateway answers. `code` is stable; `message` is for people."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal error"
    overload: ClassVar[bool] = False  # overload answers carry the shopper's busy message
    # every 429/503 carries Retry-After (retry_after_s, default 1)

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.extra = extra
        super().__init__(self.message)


class InvalidRequest(GatewayError):
    status, code, default_message = 400, "invalid_request", "invalid request"


class Unauthorized(GatewayError):
    status, code, default_message = 401, "unauthorized", "missing or wrong bearer token"


class SaleNotActive(GatewayError):
    status, code, default_message = 403, "sale_not_active", "the sale of this SKU is not active"


class BadSignature(GatewayError):
    status, code = 401, "bad_signature"
    default_message = "X-Signature is missing or is not the HMAC-SHA256 of the body"


class UnknownSku(GatewayError):
    status, code = 404, "unknown_sku"
    default_message = "no such SKU in this promotion"


class UnknownOrder(GatewayError):
    status, code, default_message = 404, "unknown_order", "no such order"


class NotFound(GatewayError):
    status, code, default_message = 404, "not_found", "no such endpoint"


class MethodNotAllowed(GatewayError):
    status, code, default_message = 405, "method_not_allowed", "method not allowed"


class SoldOut(GatewayError):
    status, code, default_message = 409, "sold_out", "sold out"


class LimitExceeded(GatewayError):
    status, code = 409, "limit_exceeded"
    default_message = "per-user limit of this SKU reached"


class KeyInUse(GatewayError):
    status, code = 409, "idempotency_key_in_use"
    default_message = "the first request with this idempotency key is still being processed"


class PaymentReused(GatewayError):
    status, code = 409, "payment_id_reused"
    default_message = "this payment_id already confirmed another order"


class StockBelowCommitted(GatewayError):
    status, code = 409, "stock_below_committed"
    default_message = "stock cannot be lower than the units already held plus sold"


class BucketsFixed(GatewayError):
    status, code = 409, "buckets_fixed"
    default_message = "the number of stock buckets is fixed when the SKU is created"


class DrawPending(GatewayError):
    status, code = 409, "draw_pending"
    default_message = "the draw of this SKU is not done yet: its seed is revealed once it is"


class NoDraw(GatewayError):
    status, code = 404, "no_draw"
    default_message = "this SKU has no fair start (it was never configured with prequeue_s)"


class PayloadTooLarge(GatewayError):
    status, code, default_message = 413, "payload_too_large", "request body too large"


class KeyReused(GatewayError):
    status, code = 422, "idempotency_key_reused"
    default_message = "this idempotency key was already used with a different request"


class RateLimited(GatewayError):
    status, code, overload = 429, "rate_limited", True


class ClientRateLimited(GatewayError):
    """This user's or this client address's own budget is spent (`limit`: "user" | "client");
    the others are still served."""

    status, code, overload = 429, "client_rate_limited", True


class BreakerOpen(GatewayError):
    status, code, overload = 503, "busy", True


class QueueFull(GatewayError):
    status, code, overload = 503, "queue_full", True


class BackendUnavailable(GatewayError):
    status, code, overload = 503, "unavailable", True


class StockMoving(BackendUnavailable):
    """A bucketed SKU's stock was still moving between buckets at the end of a sale: not known
    to be sold out yet. Redis is fine, so the circuit breaker does not count it."""


class NotApplied(BackendUnavailable):
    """Redis surely did not run the command (no connection, or its cluster slot is moving)."""


class AdminDisabled(GatewayError):
    status, code = 503, "admin_disabled"
    default_message = "admin endpoints are disabled: FLASHGATE_ADMIN_TOKEN is not set"


class PaymentsDisabled(GatewayError):
    status, code = 503, "payments_disabled"
    default_message = "payment confirmation is disabled: FLASHGATE_PAYMENT_SECRET is not set"


RETRY_AFTER_STATUSES = (429, 503)  # every answer with one of these carries Retry-After


def error_body(exc: GatewayError, busy_message: str) -> dict[str, Any]:
    """The JSON body of an error: code, message, detail fields. An overload answer's message
    is the shopper's `busy_message` (a setting), whatever the error says."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.message, **exc.extra}
    if exc.overload:
        body["message"] = busy_message
    return body


def error_headers(exc: GatewayError) -> dict[str, str]:
    """The headers of an error: its own, and `Retry-After` in whole seconds (at least 1) on
    every 429 and 503."""
    headers = dict(exc.headers)
    if exc.status in RETRY_AFTER_STATUSES:
        headers["Retry-After"] = str(max(1, exc.retry_after_s or 1))
    return headers
