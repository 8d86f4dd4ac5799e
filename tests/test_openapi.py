"""`GET /openapi.json`: a valid OpenAPI 3.1 document, served without auth, that lists exactly
the routes the app serves and exactly the error codes of `gateway/errors.py`, and whose schemas
match real answers (schemathesis fuzzes it in `test_schemathesis.py`)."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from schemathesis.core.errors import InvalidSchema
from starlette.routing import Route

from gateway import errors
from gateway.errors import GatewayError
from gateway.settings import Settings
from gateway.web import openapi
from gateway.web.app import create_app
from gateway.web.orders import ORDER_PATH
from tests.support.api import ADMIN, Client, MakeClient, create, put_sku

SECRET = "openapi-secret"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def leaves(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from leaves(sub)


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def error_codes(response: dict[str, Any]) -> list[str]:
    """The `error` enum of an error response (`openapi._error_schema`)."""
    schema = response["content"]["application/json"]["schema"]
    codes: list[str] = schema["allOf"][1]["properties"]["error"]["enum"]
    return codes


def document(settings: Settings) -> dict[str, Any]:
    """The document of an app with these settings, built from its route declarations."""
    doc: dict[str, Any] = create_app(settings).state.document.build()
    return doc


async def fetch(client: Client) -> dict[str, Any]:
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    doc: dict[str, Any] = r.json()
    return doc


def test_the_document_is_valid_openapi_3_1(settings: Settings) -> None:
    # Built here, not fetched: validation holds the loop for most of a second, which an app
    # running on it would not survive cleanly. The served bytes are this document (below).
    doc = document(settings)
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 schema (jsonschema-rs)
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name  # JSON Schema 2020-12
    for path, method, op in operations(doc):
        for parameter in op.get("parameters", []):
            assert jsonschema_rs.meta.is_valid(parameter["schema"]), (path, method)
            jsonschema_rs.validator_for(parameter["schema"])  # its pattern is an ECMA regex
            if "example" in parameter:
                assert jsonschema_rs.is_valid(parameter["schema"], parameter["example"])
    # The check can fail: a document without its version is refused.
    broken = {**doc, "info": {"title": "flashgate"}}
    with pytest.raises((InvalidSchema, jsonschema_rs.ValidationError)):
        schemathesis.openapi.from_dict(broken).validate()


async def test_served_without_auth_built_once(make_client: MakeClient, settings: Settings) -> None:
    served = settings.replace(payment_secret=SECRET)
    client = await make_client(payment_secret=SECRET)
    first = await client.get("/openapi.json")  # no Authorization, the admin token set
    second = await client.get("/openapi.json")
    assert first.status_code == second.status_code == 200
    assert (
        first.content
        == second.content
        == openapi.render(served, create_app(served).state.document.items)
    )
    assert first.json()["info"]["version"]


async def test_bounds_that_are_settings_follow_them(make_client: MakeClient) -> None:
    doc = await fetch(await make_client(max_quantity=3))
    quantity = doc["components"]["schemas"]["OrderRequest"]["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"]) == (1, 3)


def test_every_route_is_documented(settings: Settings) -> None:
    """A route added without its documentation (or documented and gone) fails here."""
    app = create_app(settings)
    served = {(ORDER_PATH, "post")}  # the bare handler in front of Starlette (front.GatewayApp)
    for route in app.routes:
        assert isinstance(route, Route), route
        assert route.methods, route.path
        served |= {(route.path, m.lower()) for m in route.methods if m != "HEAD"}
    documented = {(path, method) for path, method, _ in operations(document(settings))}
    assert documented == served


def test_error_codes_match_errors_py(settings: Settings) -> None:
    doc = document(settings)
    classes = {cls.code: cls for cls in leaves(GatewayError)}
    documented: dict[str, set[int]] = {}
    for _, _, op in operations(doc):
        for status, response in op["responses"].items():
            if int(status) >= 400:
                for code in error_codes(response):
                    documented.setdefault(code, set()).add(int(status))
    for response in doc["components"]["responses"].values():  # 404 / 405 of routing
        for code in error_codes(response):
            documented.setdefault(code, set()).add(classes[code].status)
    http_layer = {body["error"]: {status} for status, body in openapi.HTTP_LAYER.items()}
    # Every code of errors.py is documented, under its own status, and nothing else is.
    assert set(documented) == set(classes) | set(http_layer)
    for code, statuses in documented.items():
        expected = {classes[code].status} if code in classes else set()
        assert statuses == expected | http_layer.get(code, set()), code


def test_each_operation_documents_its_errors_by_status(settings: Settings) -> None:
    doc = document(settings)
    create_op = doc["paths"][ORDER_PATH]["post"]
    assert set(create_op["responses"]) == {
        "202", "400", "403", "404", "408", "409", "413", "422", "429", "431", "503",
    }  # fmt: skip
    assert error_codes(create_op["responses"]["409"]) == [
        "sold_out",
        "limit_exceeded",
        "idempotency_key_in_use",
    ]
    assert error_codes(create_op["responses"]["503"]) == ["busy", "queue_full", "unavailable"]
    assert create_op["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert create_op["parameters"][0]["name"] == "X-Idempotency-Key"
    for path, method, op in operations(doc):
        admin = path.startswith("/api/v1/admin/") or path == "/api/v1/order/switch"
        assert (op.get("security") == [{"adminToken": []}]) == admin, (path, method)
        if admin:
            assert error_codes(op["responses"]["503"]) == ["admin_disabled", "unavailable"]
            assert error_codes(op["responses"]["401"]) == ["unauthorized"]
    confirm = doc["paths"]["/api/v1/payment/confirm"]["post"]
    assert confirm["security"] == [{"paymentSignature": []}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["adminToken"] == {**schemes["adminToken"], "type": "http", "scheme": "bearer"}
    assert schemes["paymentSignature"]["name"] == "X-Signature"
    switch = doc["paths"]["/api/v1/order/switch"]["post"]["parameters"]
    assert switch[0]["schema"]["enum"] == ["QUEUE_ONLY", "NORMAL"]


class Conformance:
    """Checks real answers against the document: status documented, body of its schema."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, path: str, response: httpx.Response) -> httpx.Response:
        method = response.request.method.lower()
        responses = self.doc["paths"][path][method]["responses"]
        status = str(response.status_code)
        assert status in responses, (path, method, status, response.text)
        schema = responses[status]["content"]["application/json"]["schema"]
        wrapped = {"allOf": [schema], "components": self.doc["components"]}
        validator = jsonschema_rs.Draft202012Validator(wrapped)
        errors = [e.message for e in validator.iter_errors(response.json())]
        assert not errors, (path, method, status, response.text, errors)
        self.seen.add((path, method, status))
        return response


async def test_real_answers_match_the_document(make_client: MakeClient) -> None:
    """Every success body, and the error bodies with a detail field, from real flows."""
    c = await make_client(payment_secret=SECRET)
    doc = Conformance(await fetch(c))
    sku, sku_changes = "/api/v1/admin/skus/{sku_id}", "/api/v1/admin/skus/{sku_id}/changes"
    order, switch = "/api/v1/order/{order_id}", "/api/v1/order/switch"

    doc.check(sku, await put_sku(c, stock=2, per_user_limit=2, starts_at=1, ends_at=2**31))
    doc.check(sku, await put_sku(c, stock=2, per_user_limit=2))
    doc.check(sku, await c.get("/api/v1/admin/skus/sku-42", headers=ADMIN))
    doc.check(sku_changes, await c.get("/api/v1/admin/skus/sku-42/changes", headers=ADMIN))
    doc.check(sku, await c.get("/api/v1/admin/skus/nope", headers=ADMIN))
    doc.check(sku, await c.get("/api/v1/admin/skus/sku-42"))  # 401

    key = str(uuid.uuid4())
    held = doc.check(ORDER_PATH, await create(c, key))
    assert held.json()["status"] == "HELD"
    replay = doc.check(ORDER_PATH, await create(c, key))
    assert replay.headers["Idempotent-Replayed"] == "true"
    doc.check(ORDER_PATH, await create(c, key, quantity=2))  # 422
    doc.check(ORDER_PATH, await create(c, user_id="u2", quantity=2))  # 409 sold_out
    order_id = held.json()["order_id"]
    doc.check(order, await c.get(f"/api/v1/order/{order_id}"))
    doc.check(sku, await put_sku(c, stock=0, per_user_limit=2))  # 409 stock_below_committed

    body = f'{{"order_id":"{order_id}","payment_id":"pay-1"}}'.encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    paid = await c.post("/api/v1/payment/confirm", content=body, headers={"X-Signature": signature})
    assert doc.check("/api/v1/payment/confirm", paid).status_code == 202
    doc.check("/api/v1/payment/confirm", await c.post("/api/v1/payment/confirm", content=body))

    doc.check(switch, await c.get(switch, headers=ADMIN))  # never switched: changed_at null
    headers = {**ADMIN, "X-Operator": "alice"}
    doc.check(switch, await c.post(f"{switch}?mode=QUEUE_ONLY", headers=headers))
    queued = doc.check(ORDER_PATH, await create(c, user_id="u3"))
    assert queued.json()["status"] == "QUEUED"
    doc.check(switch, await c.post(f"{switch}?mode=NORMAL", headers=ADMIN))
    doc.check(switch, await c.post(f"{switch}?mode=OFF", headers=ADMIN))  # 400

    for path in ("/healthz", "/readyz", "/openapi.json"):
        doc.check(path, await c.get(path))
    assert {status for path, _, status in doc.seen if path == ORDER_PATH} == {
        "202", "409", "422",
    }  # fmt: skip


async def test_disabled_answers_match_the_document(make_client: MakeClient) -> None:
    c = await make_client(admin_token=None, payment_secret=None)
    doc = Conformance(await fetch(c))
    r = doc.check("/api/v1/order/switch", await c.get("/api/v1/order/switch"))
    assert r.json()["error"] == errors.AdminDisabled.code
    r = await c.post("/api/v1/payment/confirm", content=b"{}")
    assert doc.check("/api/v1/payment/confirm", r).json()["error"] == "payments_disabled"
