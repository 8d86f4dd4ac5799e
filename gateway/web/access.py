"""The access log (`flashgate.access`, FLASHGATE_ACCESS_LOG): one line per answered request."""

from __future__ import annotations

import logging
import re
import uuid

import msgspec
from starlette.responses import Response
from starlette.types import Scope

from gateway.schemas import ID_PATTERN

_access_log = logging.getLogger("flashgate.access")
_REQUEST_ID = re.compile(ID_PATTERN)  # a request id the client gives is an id like the others


def access(
    scope: Scope,
    route: str,
    status: int,
    code: str,
    seconds: float,
    order_id: str | None,
    client: str,
) -> None:
    """One access-log line (telemetry/logs.py): the client's X-Request-Id when it is an id,
    else a new one, and the client's address (`clients.py`); never another header, never a
    body."""
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
        "client": client or None,
    }
    if order_id:
        fields["order_id"] = order_id
    # the fields are in the message too, for FLASHGATE_LOG_FORMAT=text
    _access_log.info(
        "%s %s %d %s %.3f ms request_id=%s order_id=%s client=%s",
        scope["method"], route, status, code, fields["duration_ms"], request_id,
        order_id or "-", client or "-", extra=fields,
    )  # fmt: skip


def order_id_of(response: Response) -> str | None:
    """The order id of a 202 order answer (a replay's too)."""
    try:
        order_id = msgspec.json.decode(response.body).get("order_id")
    except (msgspec.DecodeError, AttributeError):
        return None
    return order_id if isinstance(order_id, str) else None
