"""schemathesis against the app in process, on the real server: requests generated from
`GET /openapi.json` (valid ones, and invalid ones for every parameter and body), each answer
checked against that document: never a 5xx, a documented status, a documented content type
and headers, a body matching its schema. Afterwards the inventory audit must be clean."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import hypothesis
import pytest
import schemathesis
from redis import Redis as SyncRedis
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import Settings
from gateway.transport.connect import create_client
from gateway.web.app import create_app
from gateway.web.services import Services
from tests.support.api import ADMIN, ADMIN_TOKEN
from tests.support.state import audit_breaches

T = TypeVar("T")
SECRET = "fuzz-secret"
PAYMENT_PATH = "/api/v1/payment/confirm"
# Bounded for CI (about 11 operations): few examples each, the same ones every run.
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20260101,
        "generation": {
            "max-examples": 50,
            "deterministic": True,
            "with-security-parameters": False,
        },
    }
)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.unsupported_method,
    checks.allow_header_conformance,
    checks.negative_data_rejection,
    checks.missing_required_header,
]


def run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on its own loop (the app under test runs on schemathesis' loop)."""

    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


class SignPayments:
    """Signs each payment body as the provider would; the app under test is unchanged."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PAYMENT_PATH:
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"x-signature"]
        scope = {**scope, "headers": [*headers, (b"x-signature", signature)]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def fuzz_settings(redis_url: str = "") -> Settings:
    return Settings(
        redis_url=redis_url or None,
        admin_token=ADMIN_TOKEN,
        payment_secret=SECRET,
        redis_timeout_ms=10_000,
    )


# Loaded at import for `parametrize` (schemathesis' fixture-loaded schemas do not run under
# pytest 9); the `app` fixture checks that the app serves this very document.
schema = schemathesis.openapi.from_dict(
    create_app(fuzz_settings()).state.document.build(), config=CONFIG
)


async def _seed(settings: Settings) -> None:
    """A flushed server with the document's example SKU, so example orders are held."""
    client = create_client(settings)
    try:
        await client.flushall()
        app = create_app(settings, redis=client)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://seed") as http:
                body = {"promotion_id": "promo-1111", "stock": 1000, "per_user_limit": 5}
                r = await http.put("/api/v1/admin/skus/sku-42", json=body, headers=ADMIN)
                assert r.status_code == 201, r.text
    finally:
        await client.aclose()


async def _audit(settings: Settings) -> dict[str, list[str]]:
    client = create_client(settings)
    try:
        return await audit_breaches(client, settings)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[ASGIApp]:
    """The app on a flushed server with the example SKU; afterwards, the audit is clean."""
    settings = fuzz_settings(redis_url)
    run_in_thread(lambda: _seed(settings))
    app = SignPayments(create_app(settings), SECRET)
    try:
        served = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
        assert served.raw_schema == schema.raw_schema
        yield app
    finally:
        asgi.shutdown_lifespans()  # the app's Redis clients close before the server does
    assert run_in_thread(lambda: _audit(settings)) == {}


@schema.parametrize()
def test_answers_conform_to_the_document(case: Any, app: ASGIApp) -> None:
    case.call_and_validate(app=app, headers=ADMIN, checks=CHECKS)


LINKED = ["configureSku", "getSku", "getSkuChanges", "createOrder", "getOrder", "confirmPayment"]


def test_linked_flows_conform_to_the_document(app: ASGIApp, redis_url: str) -> None:
    """Sequences along the document's links: a SKU configured, ordered from, the order read
    and paid, read again; every answer checked as above. Each sequence starts on a flushed
    server, so that the same draws meet the same answers (Hypothesis replays them)."""
    flush = SyncRedis.from_url(redis_url)
    assert isinstance(app, SignPayments)
    gateway: Services = app.app.state.services  # type: ignore[attr-defined]

    class Flows(schema.include(operation_id=LINKED).as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            flush.flushall()
            gateway.intake.memo.clear()  # a SKU sold out in the last sequence is not any more

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"app": app, "headers": ADMIN}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    try:
        Flows.run(
            settings=hypothesis.settings(
                max_examples=100,
                stateful_step_count=10,
                derandomize=True,
                deadline=None,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
        )
    finally:
        flush.close()
