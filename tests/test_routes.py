"""The HTTP contract of CONTRACT.md, through the ASGI app, against the real server."""

from __future__ import annotations

import time
import uuid

import pytest
from redis.asyncio import Redis

from tests.support.api import ADMIN, Client, MakeClient, create, order_body, put_sku
from tests.support.state import BOTH_BACKENDS, snapshot

pytestmark = BOTH_BACKENDS


@pytest.fixture
async def sku(client: Client) -> None:
    assert (await put_sku(client)).status_code == 201


async def test_create_holds_and_get_shows_history(client: Client, sku: None) -> None:
    r = await create(client, quantity=2)
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "HELD" and body["sku_id"] == "sku-42" and body["quantity"] == 2
    assert body["hold_expires_at"] > time.time() * 1000 + 899_000
    g = await client.get(f"/api/v1/order/{body['order_id']}")
    assert g.status_code == 200
    order = g.json()
    assert {
        k: order[k] for k in ("order_id", "status", "user_id", "sku_id", "quantity", "promotion_id")
    } == {
        "order_id": body["order_id"],
        "status": "HELD",
        "user_id": "u1",
        "sku_id": "sku-42",
        "quantity": 2,
        "promotion_id": "promo-1",
    }
    assert order["history"] == [{"from": None, "to": "HELD", "at": order["created_at"]}]
    view = (await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert (view["stock"], view["available"], view["held"], view["sold"]) == (10, 8, 2, 0)


async def test_replay_is_byte_for_byte_with_header(client: Client, sku: None) -> None:
    key = str(uuid.uuid4())
    first = await create(client, key)
    again = await create(client, key)
    assert again.status_code == 202
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    view = (await client.get("/api/v1/admin/skus/sku-42", headers=ADMIN)).json()
    assert view["held"] == 1


@pytest.mark.parametrize("header", ["X-Idempotency-Key", "Idempotency-Key", "x-idempotency-key"])
@pytest.mark.parametrize("quoted", [False, True])
async def test_key_header_forms(client: Client, sku: None, header: str, quoted: bool) -> None:
    key = str(uuid.uuid4())
    value = f'"{key}"' if quoted else key
    r1 = await client.post("/api/v1/order/create", json=order_body(), headers={header: value})
    assert r1.status_code == 202
    # every form names the same key: the bare upper-case form replays it
    r2 = await create(client, key.upper())
    assert r2.status_code == 202 and r2.headers["idempotent-replayed"] == "true"


async def test_same_key_different_body_is_422(client: Client, redis: Redis, sku: None) -> None:
    await put_sku(client, "sku-7")
    key = str(uuid.uuid4())
    assert (await create(client, key)).status_code == 202
    before = await snapshot(redis)
    for changed in ({"quantity": 2}, {"sku_id": "sku-7"}):
        r = await create(client, key, **changed)
        assert r.status_code == 422
        assert r.json()["error"] == "idempotency_key_reused"
    assert await snapshot(redis) == before


async def test_refusal_codes(client: Client, redis: Redis) -> None:
    now = int(time.time())
    await put_sku(client, "later", starts_at=now + 3600)
    await put_sku(client, "over", starts_at=now - 7200, ends_at=now - 3600)
    await put_sku(client, "few", stock=1, per_user_limit=1)
    await put_sku(client, "lim", stock=10, per_user_limit=2)
    assert (await create(client, sku_id="few", user_id="a")).status_code == 202
    assert (await create(client, sku_id="lim", quantity=2)).status_code == 202
    before = await snapshot(redis)
    cases = [
        ({"sku_id": "nope"}, 404, "unknown_sku"),
        ({"promotion_id": "promo-2"}, 404, "unknown_sku"),
        ({"sku_id": "later"}, 403, "sale_not_active"),
        ({"sku_id": "over"}, 403, "sale_not_active"),
        ({"sku_id": "few", "user_id": "b"}, 409, "sold_out"),
        ({"sku_id": "lim"}, 409, "limit_exceeded"),
    ]
    for fields, status, code in cases:
        r = await create(client, **fields)
        assert (r.status_code, r.json()["error"]) == (status, code), fields
        assert r.json()["message"]
    assert await snapshot(redis) == before


async def test_refused_key_is_evaluated_afresh(client: Client) -> None:
    await put_sku(client, "s", stock=0)
    key = str(uuid.uuid4())
    assert (await create(client, key, sku_id="s")).status_code == 409
    await put_sku(client, "s", stock=1)
    r = await create(client, key, sku_id="s")
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers


async def test_get_unknown_or_malformed_order(client: Client, sku: None) -> None:
    order_id = (await create(client)).json()["order_id"]
    rand, _, sku_id = order_id.partition(".")
    for bad in (
        f"{'a' * 26}.sku-42",
        f"{rand}.other",
        "x",
        f"{rand}.{{sku-42}}",
        "*",
        f"{rand}.sku-42:o",
        "%7Bsku-42%7D",
        "a" * 500,
    ):
        r = await client.get(f"/api/v1/order/{bad}")
        assert (r.status_code, r.json()["error"]) == (404, "unknown_order"), bad


async def test_order_ids_are_unguessable(client: Client) -> None:
    await put_sku(client, "s", stock=200, per_user_limit=200)
    ids = {(await create(client, sku_id="s")).json()["order_id"] for _ in range(50)}
    assert len(ids) == 50
    for oid in ids:
        rand, _, sku_id = oid.partition(".")
        assert sku_id == "s" and len(rand) == 26  # 26 base32 chars = 130 bits, 128 random


class TestAdmin:
    async def test_needs_the_token(self, client: Client) -> None:
        body = {"promotion_id": "p", "stock": 1, "per_user_limit": 1}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic x"},
            {"Authorization": "Bearer"},
            {"Authorization": "test-admin-token"},
        ):
            r = await client.put("/api/v1/admin/skus/s", json=body, headers=headers)
            assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = await client.get("/api/v1/admin/skus/s", headers=headers)
            assert r.status_code == 401

    async def test_disabled_without_token(self, make_client: MakeClient) -> None:
        c = await make_client(admin_token=None)
        r = await c.get("/api/v1/admin/skus/s", headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (503, "admin_disabled")
        r = await c.put("/api/v1/admin/skus/s", json={}, headers={})
        assert r.status_code == 503 and r.headers["retry-after"]

    async def test_put_creates_then_updates(self, client: Client) -> None:
        r = await put_sku(client, "s", stock=5, starts_at=100, ends_at=200)
        assert r.status_code == 201
        assert r.json() == {
            "sku_id": "s",
            "promotion_id": "promo-1",
            "stock": 5,
            "available": 5,
            "held": 0,
            "sold": 0,
            "per_user_limit": 5,
            "starts_at": 100,
            "ends_at": 200,
        }
        r = await put_sku(client, "s", stock=7)
        assert r.status_code == 200 and r.json()["available"] == 7 and "starts_at" not in r.json()

    async def test_stock_below_committed_is_409(self, client: Client, redis: Redis) -> None:
        await put_sku(client, stock=5)
        await create(client, quantity=3)
        before = await snapshot(redis)
        r = await put_sku(client, stock=2)
        assert (r.status_code, r.json()["error"]) == (409, "stock_below_committed")
        assert await snapshot(redis) == before

    async def test_unknown_sku_is_404(self, client: Client) -> None:
        r = await client.get("/api/v1/admin/skus/none", headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (404, "unknown_sku")

    @pytest.mark.parametrize(
        "body",
        [
            b"{",
            b"[]",
            b'{"promotion_id": "p", "stock": -1, "per_user_limit": 1}',
            b'{"promotion_id": "p", "stock": 1, "per_user_limit": 0}',
            b'{"promotion_id": "p{x}", "stock": 1, "per_user_limit": 1}',
            b'{"promotion_id": "p", "stock": "1", "per_user_limit": 1}',
            b'{"promotion_id": "p", "stock": 1, "per_user_limit": 1, "starts_at": 9, "ends_at": 5}',
            b'{"promotion_id": "p", "stock": 1, "per_user_limit": 1, "extra": 1}',
        ],
    )
    async def test_bad_bodies_are_400(self, client: Client, redis: Redis, body: bytes) -> None:
        before = await snapshot(redis)
        r = await client.put("/api/v1/admin/skus/s", content=body, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        assert await snapshot(redis) == before

    @pytest.mark.parametrize("sku_id", ["a{b}", "a*", "a%20b", "x" * 65, "a%0Ab", "nl%0A"])
    async def test_hostile_sku_ids_are_400(self, client: Client, redis: Redis, sku_id: str) -> None:
        body = {"promotion_id": "p", "stock": 1, "per_user_limit": 1}
        before = await snapshot(redis)  # the runtime rules the app seeded at start
        r = await client.put(f"/api/v1/admin/skus/{sku_id}", json=body, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        assert await snapshot(redis) == before


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    r = await client.get("/nope")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = await client.get("/api/v1/order/create")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    r = await client.delete("/api/v1/admin/skus/x")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    for path in ("/healthz/", "/api/v1/order/switch/", "/api/v1/order/x%2F"):
        r = await client.get(path, headers={"Host": "evil.example"})
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), path  # no redirect
        assert "location" not in r.headers


async def test_405_lists_every_method_of_the_path(client: Client) -> None:
    """Found by schemathesis: a path served by two routes answered a 405 with the methods of
    one (`Allow: POST` for the switch), and `/api/v1/order/create` matched the order lookup
    (`GET` was `404 unknown_order`, `PUT` a 405 with `Allow: GET, HEAD`)."""
    cases = {
        "/api/v1/order/switch": {"GET", "HEAD", "POST"},
        "/api/v1/admin/skus/x": {"GET", "HEAD", "PUT"},
        "/api/v1/admin/skus/x/changes": {"GET", "HEAD"},
        "/api/v1/order/create": {"POST"},
        "/api/v1/order/x": {"GET", "HEAD"},
        "/healthz": {"GET", "HEAD"},
    }
    for path, allowed in cases.items():
        for method in ("OPTIONS", "DELETE", "PATCH", "GET", "PUT", "POST"):
            if method in allowed:
                continue
            r = await client.request(method, path, headers=ADMIN)
            assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed"), (method, path)
            assert set(r.headers["allow"].replace(" ", "").split(",")) == allowed, (method, path)


async def test_quantity_limit_is_configurable(make_client: MakeClient) -> None:
    c = await make_client(max_quantity=3)
    await put_sku(c, stock=10, per_user_limit=10)
    assert (await create(c, quantity=3)).status_code == 202
    r = await create(c, quantity=4)
    assert r.status_code == 400 and "quantity" in r.json()["message"]
