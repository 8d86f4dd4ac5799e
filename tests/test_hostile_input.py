"""Malformed and hostile order requests: each gets its documented 4xx and changes nothing."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from redis.asyncio import Redis

from tests.support.api import Client, MakeClient, put_sku
from tests.support.state import BOTH_BACKENDS, snapshot

GOOD = b'{"user_id": "u1", "sku_id": "sku-42", "quantity": 1, "promotion_id": "promo-1"}'


pytestmark = BOTH_BACKENDS


def body(**fields: object) -> bytes:
    import msgspec

    base = {"user_id": "u1", "sku_id": "sku-42", "quantity": 1, "promotion_id": "promo-1"}
    base.update(fields)
    return msgspec.json.encode({k: v for k, v in base.items() if v is not ...})


BAD_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"user_id=u1"),
    ("truncated", GOOD[:-1]),
    ("array", b"[]"),
    ("null", b"null"),
    ("string", b'"x"'),
    ("trailing garbage", GOOD + b"x"),
    (
        "invalid utf-8",
        b'{"user_id": "\xff\xfe", "sku_id": "s", "quantity": 1, "promotion_id": "p"}',
    ),
    ("missing user", body(user_id=...)),
    ("missing promotion", body(promotion_id=...)),
    ("missing quantity", body(quantity=...)),
    ("quantity zero", body(quantity=0)),
    ("quantity negative", body(quantity=-1)),
    ("quantity over max", body(quantity=101)),
    ("quantity float", body(quantity=1.0)),
    ("quantity string", body(quantity="1")),
    ("quantity bool", body(quantity=True)),
    (
        "quantity huge",
        b'{"user_id": "u1", "sku_id": "sku-42", "quantity": '
        + b"9" * 400
        + b', "promotion_id": "promo-1"}',
    ),
    ("user number", body(user_id=1)),
    ("user null", body(user_id=None)),
    ("user empty", body(user_id="")),
    ("user too long", body(user_id="u" * 65)),
    ("hash-tag braces", body(sku_id="{sku-42}")),
    ("brace in user", body(user_id="u}1")),
    ("glob", body(sku_id="sku-*")),
    ("glob ?", body(user_id="u?")),
    ("space", body(user_id="u 1")),
    ("newline", body(user_id="u\n1")),
    ("trailing newline user", body(user_id="u1\n")),
    ("trailing newline sku", body(sku_id="sku-42\n")),
    ("trailing newline promotion", body(promotion_id="promo-1\n")),
    ("trailing CR", body(user_id="u1\r")),
    ("nul", body(user_id="u\x001")),
    ("pipe", body(promotion_id="a|b")),
    ("slash", body(sku_id="a/b")),
    ("unicode", body(user_id="ü")),
    ("unknown field", body(extra="x")),
    ("nested", body(user_id={"$gt": ""})),
    ("duplicate keys smuggling a brace", GOOD[:-1] + b', "sku_id": "{x}"}'),
]


@pytest.fixture
async def seeded(client: Client, redis: Redis) -> dict[bytes, object]:
    await put_sku(client)
    return await snapshot(redis)


@pytest.mark.parametrize(("name", "raw"), BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
async def test_bad_body_is_400_and_changes_nothing(
    client: Client, redis: Redis, seeded: dict[bytes, object], name: str, raw: bytes
) -> None:
    r = await client.post(
        "/api/v1/order/create",
        content=raw,
        headers={"X-Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"},
    )
    assert r.status_code == 400, (name, r.text)
    assert r.json()["error"] == "invalid_request"
    assert r.json()["message"]
    assert await snapshot(redis) == seeded


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body is empty: a JSON object is expected"),
        (b"  ", "request body is empty: a JSON object is expected"),
        (GOOD[:-1], "JSON is malformed: input data was truncated"),
        (b"user_id=u1", "JSON is malformed: invalid character (byte 0)"),
    ],
)
async def test_a_body_that_is_not_json_is_said_to_be_so(
    client: Client, redis: Redis, seeded: dict[bytes, object], raw: bytes, message: str
) -> None:
    r = await client.post(
        "/api/v1/order/create",
        content=raw,
        headers={"X-Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"},
    )
    assert (r.status_code, r.json()) == (400, {"error": "invalid_request", "message": message})
    assert await snapshot(redis) == seeded


BAD_KEYS = [
    None,
    "",
    "abc",
    "not-a-uuid-at-all-but-36-characters!",
    str(uuid.uuid4()) + "0",
    '"' + str(uuid.uuid4()),
    "{" + str(uuid.uuid4())[1:],
    str(uuid.uuid4()).replace("-", ""),
    "*",
    "a" * 5000,
    str(uuid.uuid4())[:-1] + "*",
    "'" + str(uuid.uuid4()) + "'",
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_idempotency_key_is_400(
    client: Client, redis: Redis, seeded: dict[bytes, object], key: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Idempotency-Key"] = key
    r = await client.post("/api/v1/order/create", content=GOOD, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert "Idempotency-Key" in r.json()["message"]
    assert await snapshot(redis) == seeded


async def test_body_over_limit_is_413(
    client: Client, redis: Redis, seeded: dict[bytes, object]
) -> None:
    big = GOOD[:-1] + b', "pad": "' + b"x" * 5000 + b'"}'
    r = await client.post(
        "/api/v1/order/create", content=big, headers={"X-Idempotency-Key": str(uuid.uuid4())}
    )
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")

    async def chunks():  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b"x" * 1000

    r = await client.post(
        "/api/v1/order/create", content=chunks(), headers={"X-Idempotency-Key": str(uuid.uuid4())}
    )
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    r = await client.post(
        "/api/v1/order/create",
        content=GOOD,
        headers={"X-Idempotency-Key": str(uuid.uuid4()), "Content-Length": "99999999999"},
    )
    assert r.status_code in (400, 413)
    assert await snapshot(redis) == seeded


async def test_body_limit_is_configurable(make_client: MakeClient) -> None:
    c = await make_client(max_body_bytes=64)
    await put_sku(c)
    r = await c.post(
        "/api/v1/order/create", content=GOOD, headers={"X-Idempotency-Key": str(uuid.uuid4())}
    )
    assert r.status_code == 413


async def asgi_order(app: object, messages: list[dict[str, object]]) -> tuple[int, bytes]:
    """Drive the order endpoint at the ASGI level with these receive messages."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/order/create",
        "raw_path": b"/api/v1/order/create",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-idempotency-key", str(uuid.uuid4()).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    status = sent[0]["status"]
    assert isinstance(status, int)
    return status, b"".join(m.get("body", b"") for m in sent[1:])  # type: ignore[misc]


async def test_a_body_in_pieces_is_read_whole(make_client: MakeClient) -> None:
    c = await make_client()
    await put_sku(c)
    pieces = [GOOD[:10], GOOD[10:40], GOOD[40:]]
    messages: list[dict[str, object]] = [
        {"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(pieces)
    ]
    status, _ = await asgi_order(c._transport.app, messages)  # type: ignore[attr-defined]
    assert status == 202


async def test_a_client_gone_mid_body_is_a_quiet_400(make_client: MakeClient, redis: Redis) -> None:
    c = await make_client()
    await put_sku(c)
    before = await snapshot(redis)
    messages: list[dict[str, object]] = [
        {"type": "http.request", "body": GOOD[:20], "more_body": True},
        {"type": "http.disconnect"},
    ]
    status, body = await asgi_order(c._transport.app, messages)  # type: ignore[attr-defined]
    assert (status, msgspec.json.decode(body)["error"]) == (400, "invalid_request")
    assert await snapshot(redis) == before
