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

import aiohttp
from yarl import URL

from gateway.workers.relay.events import Event
from gateway.workers.relay.target import Refused, Unreachable

SECRET_PREFIX = "whsec_"
CONNECT_TIMEOUT_S = 5.0
# Not sent at all: the request never left (it may be sent again without counting an attempt).
# A connect timeout also covers the wait for a free connection of the pool.
NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


def secret_key(secret: str) -> bytes:
    """The signing key of a `whsec_<base64>` secret (unpadded base64 accepted)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


class WebhookTarget:
    """POSTs each event to `url`, signed with `secret`; `timeout_s` bounds each request's
    wait for its answer (the connect, or the wait for a free connection, is bounded by
    `CONNECT_TIMEOUT_S` or less, the whole request by both).

    One aiohttp session: a pool of at most `connections` HTTP/1.1 keep-alive connections
    (a relay delivers up to 16 streams side by side, one event at a time each), no cookies,
    no redirects followed (a `3xx` is a refusal). aiohttp, not httpx: a third of httpx's CPU
    per event with one stream, a twentieth with 16 (`docs/operations/relay.md`,
    Throughput). The HMAC key schedule is computed once and copied per event.
    """

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
        self._url = URL(url)
        self._mac = hmac.new(secret_key(secret), digestmod=hashlib.sha256)
        connect_s = min(CONNECT_TIMEOUT_S, timeout_s)
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s + connect_s, connect=connect_s, sock_read=timeout_s
        )
        self._connections = connections
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Make the connection pool; connections open on first use."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )

    def sign(self, event_id: str, timestamp: int, body: bytes) -> str:
        """`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`."""
        mac = self._mac.copy()
        mac.update(f"{event_id}.{timestamp}.".encode())
        mac.update(body)
        return "v1," + base64.b64encode(mac.digest()).decode()

    def headers(self, event: Event) -> dict[str, str]:
        timestamp = int(self._clock())
        return {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.sign(event.id, timestamp, event.body),
        }

    async def deliver(self, event: Event) -> None:
        if self._session is None:
            await self.start()
        assert self._session is not None
        try:
            async with self._session.post(
                self._url, data=event.body, headers=self.headers(event), allow_redirects=False
            ) as answer:
                await answer.read()  # the connection goes back to the pool once read
                status = answer.status
        except NOT_SENT as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors too
            raise Refused(f"no answer in time ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise Refused(f"connection lost after sending ({type(exc).__name__}: {exc})") from None
        if not 200 <= status < 300:
            raise Refused(f"HTTP {status}")

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
