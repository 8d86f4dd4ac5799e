"""The webhook target: one signed `POST` per event (the Standard Webhooks scheme).

Headers `webhook-id` (the event id, the receiver's deduplication key), `webhook-timestamp`
(epoch seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`
keyed with the secret's bytes (`whsec_` + base64). Any 2xx confirms. A connection that cannot
be made (refused, DNS, connect timeout, no free connection) means the event surely did not
arrive: `Unreachable`. Anything after the request went out (a non-2xx answer, a read or write
timeout, a dropped connection) is `Refused`: the receiver may have seen it, so it counts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

import httpx

from gateway.workers.relay.events import Event
from gateway.workers.relay.target import Refused, Unreachable

SECRET_PREFIX = "whsec_"
CONNECT_TIMEOUT_S = 5.0
# Not sent at all: the request never left (it may be sent again without counting an attempt).
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def secret_key(secret: str) -> bytes:
    """The signing key of a `whsec_<base64>` secret (unpadded base64 accepted)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class WebhookTarget:
    """POSTs each event to `url`, signed with `secret`; `timeout_s` bounds each request's
    reads and writes (the connect is bounded by `CONNECT_TIMEOUT_S` or less)."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        connections: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self._key = secret_key(secret)
        self._timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        self._limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections
        )
        self._clock = clock
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Make the connection pool (HTTP/1.1, keep-alive); connections open on first use."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout, limits=self._limits, http1=True, http2=False
            )

    def headers(self, event: Event) -> dict[str, str]:
        timestamp = int(self._clock())
        return {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self._key, event.id, timestamp, event.body),
        }

    async def deliver(self, event: Event) -> None:
        if self._client is None:
            await self.start()
        assert self._client is not None
        try:
            answer = await self._client.post(
                self.url, content=event.body, headers=self.headers(event)
            )
        except NOT_SENT as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise Refused(f"no answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise Refused(f"connection lost after sending ({type(exc).__name__}: {exc})") from None
        if not answer.is_success:
            raise Refused(f"HTTP {answer.status_code}")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
