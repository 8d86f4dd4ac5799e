"""Response classes (msgspec-encoded JSON, pre-rendered JSON bytes) and the response of a
`GatewayError`, from its mapping in `errors.py`."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response

from gateway.errors import GatewayError, error_body, error_headers
from gateway.schemas import encoder

log = logging.getLogger("flashgate")

REPLAYED_HEADERS = {"Idempotent-Replayed": "true"}  # an idempotent replay's answer


class MsgspecResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encoder.encode(content)


class RawJSONResponse(Response):
    """JSON that is already bytes (the stored answer of an order), sent as is."""

    media_type = "application/json"


def error_response(exc: GatewayError, busy_message: str) -> Response:
    """The answer to a `GatewayError` (`errors.error_body`, `errors.error_headers`)."""
    return MsgspecResponse(
        error_body(exc, busy_message), status_code=exc.status, headers=error_headers(exc)
    )


class RenderedErrors:
    """The order path's error answers as (status, raw headers, body), each rendered once: a
    flood of one refusal (sold out from the memo, rate limited) costs no encoding. Keyed by
    everything that shapes the answer; at most `kept` of them (then it starts over)."""

    def __init__(self, busy_message: str, kept: int = 256) -> None:
        self.busy_message = busy_message
        self.kept = kept
        self._rendered: dict[tuple[Any, ...], tuple[int, list[tuple[bytes, bytes]], bytes]] = {}

    def render(self, exc: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        key = (
            type(exc),
            exc.message,
            exc.retry_after_s,
            tuple(exc.extra.items()),
            tuple(exc.headers.items()),
        )
        rendered = self._rendered.get(key)
        if rendered is None:
            if len(self._rendered) >= self.kept:
                self._rendered.clear()
            response = error_response(exc, self.busy_message)
            rendered = (exc.status, response.raw_headers, bytes(response.body))
            self._rendered[key] = rendered
        return rendered


def internal_error(method: str, path: str) -> Response:
    """500 for an exception nothing expected (logged with its traceback, never shown)."""
    log.exception("unhandled error on %s %s", method, path)
    return MsgspecResponse(
        {"error": "internal_error", "message": "internal error"}, status_code=500
    )
