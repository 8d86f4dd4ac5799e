"""The admin token check, who made an operator change, the log line of each change, and the
rate-limited log of refused credentials.

With one shared admin token, the operator's name (`X-Operator`, default "operator") is
self-declared: it tells honest operators apart, it proves nothing. The client address is the
peer's, or behind a trusted proxy the one the proxy names (`clients.py`, set in the scope by
`front.GatewayApp`). Neither the token nor any header other than `X-Operator` is ever logged.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from gateway import errors
from gateway.schemas import ID_PATTERN
from gateway.web.clients import CLIENT

log = logging.getLogger("flashgate")

DEFAULT_OPERATOR = "operator"
OPERATOR_HEADER = "x-operator"
_ID = re.compile(ID_PATTERN)
# A peer address as ASGI servers give it: IPv4, IPv6 (with a zone), a host name. Nothing that
# could break the JSON of the mode history or a log line; anything else is recorded as unknown.
_ADDRESS = re.compile(r"^[0-9A-Za-z.:%_\-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class Operator:
    name: str  # X-Operator, an id; self-declared
    client: str  # the peer's address, "" = unknown


def client_address(scope: Scope) -> str:
    """The client's address (`clients.py`), else the peer's host from the ASGI scope ("" when
    absent or not address-like)."""
    host = scope.get(CLIENT)
    if host is None:
        client = scope.get("client")
        host = client[0] if client else ""
    return host if isinstance(host, str) and _ADDRESS.match(host) else ""


def operator_of(request: Request) -> Operator:
    """The operator of an admin request: `400 invalid_request` for a malformed or repeated
    `X-Operator` (one value, 1-64 characters of `[A-Za-z0-9_.:-]`)."""
    values = request.headers.getlist(OPERATOR_HEADER)
    if len(values) > 1:
        raise errors.InvalidRequest("send at most one X-Operator header")
    name = values[0] if values else DEFAULT_OPERATOR
    if not _ID.match(name):
        raise errors.InvalidRequest("X-Operator must be 1-64 characters of [A-Za-z0-9_.:-]")
    return Operator(name, client_address(request.scope))


def require_admin(request: Request, token: str | None, refusals: RefusalLog) -> Operator:
    """Bearer token check in constant time; admin is off (503) when no token is set. Returns
    who is calling (`X-Operator`, self-declared, and the peer address); a malformed
    `X-Operator` is `400`, after the token check. A refusal is counted in `refusals`."""
    if not token:
        raise errors.AdminDisabled()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )
    if not ok:
        refusals.refused(client_address(request.scope))
        raise errors.Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="flashgate"'})
    return operator_of(request)


# What every operator endpoint can answer besides its own errors: a malformed X-Operator,
# a wrong token, admin off, Redis down. `admin_raises(*own)` in a route declaration.
def admin_raises(*own: type[errors.GatewayError]) -> tuple[type[errors.GatewayError], ...]:
    return (errors.InvalidRequest, errors.Unauthorized, *own, errors.AdminDisabled,
            errors.BackendUnavailable)  # fmt: skip


def log_change(op: Operator, what: str, **values: object) -> None:
    """One INFO line per successful operator change: who, from where, what, the values."""
    shown = " ".join(f"{k}={'none' if v is None else v}" for k, v in values.items())
    log.info("operator %s from %s: %s %s", op.name, op.client or "unknown", what, shown)


class RefusalLog:
    """Refused credentials of one kind, logged at WARNING at most once per `interval_s` (per
    process): the first at once, those within the interval counted and reported, with the last
    client address, by the first refusal after it (or by `flush`). `clock` is monotonic seconds.
    """

    def __init__(
        self,
        kind: str,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.kind = kind
        self.interval_s = interval_s
        self.clock = clock
        self.logger = logger
        self.count = 0  # refused since the last line
        self.last_client = ""
        self._last_line: float | None = None

    def refused(self, client: str) -> bool:
        """Count one refusal; True when it was logged now."""
        self.count += 1
        self.last_client = client
        now = self.clock()
        if self._last_line is not None and now - self._last_line < self.interval_s:
            return False
        self._emit(now)
        return True

    def flush(self) -> None:
        """Log what was counted since the last line, if anything (at shutdown)."""
        if self.count:
            self._emit(self.clock())

    def _emit(self, now: float) -> None:
        self.logger.warning(
            "refused %s: %d since the last report, the last from %s",
            self.kind,
            self.count,
            self.last_client or "unknown",
        )
        self.count = 0
        self._last_line = now
