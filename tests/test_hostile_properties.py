"""Property-based hostile input (Hypothesis) against the real server: bodies, idempotency keys,
headers, path ids and signatures drawn at random and mutated from valid requests. Whatever
comes, the answer is never a 5xx, and a request that is refused changes nothing in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import uuid
from collections.abc import Iterator
from socket import AF_INET, AF_INET6
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from redis.asyncio import Redis

from gateway.settings import Settings
from gateway.web.app import create_app
from gateway.web.clients import ClientAddress, forwarded_for, parse_hop
from tests.support.api import ADMIN, ADMIN_TOKEN
from tests.support.state import snapshot

SECRET = "prop-secret"
EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
hostile_text = st.text(max_size=80) | st.sampled_from(
    ["", "{x}", "a}b", "*", "?", "[a]", "a\n", "a\r\n", "\x00", "ü", "a" * 65, "fg:{sku-p}:sku"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = ids | hostile_text | json_values


def order_bodies() -> st.SearchStrategy[bytes]:
    """Valid orders (some for an unknown SKU or promotion), the same with one field replaced
    by anything or dropped, arbitrary JSON and arbitrary bytes."""
    valid = st.fixed_dictionaries(
        {
            "user_id": ids,
            "sku_id": st.sampled_from(["sku-p", "sku-p", "sku-p", "nope"]),
            "quantity": st.integers(min_value=1, max_value=3),
            "promotion_id": st.sampled_from(["promo-p", "promo-p", "promo-p", "promo-x"]),
        }
    )

    damaged = st.builds(
        _damage,
        valid,
        st.sampled_from(["user_id", "sku_id", "quantity", "promotion_id", "extra"]),
        field_values,
        st.booleans(),
    )
    as_json = valid | damaged
    return (
        as_json.map(lambda d: json.dumps(d).encode())
        | st.binary(max_size=300)
        | json_values.map(lambda v: json.dumps(v).encode())
    )


def _damage(order: dict[str, Any], name: str, value: Any, drop: bool) -> dict[str, Any]:
    """One field replaced by anything, or dropped."""
    out = dict(order)
    if drop:
        out.pop(name, None)
    else:
        out[name] = value
    return out


clean_configs = st.fixed_dictionaries(
    {
        "promotion_id": ids,
        "stock": st.integers(min_value=0, max_value=10**7),
        "per_user_limit": st.integers(min_value=1, max_value=100),
    },
    optional={"starts_at": st.integers(min_value=0, max_value=2**33)},
)
sku_configs = (
    clean_configs
    | st.builds(
        _damage,
        clean_configs,
        st.sampled_from(["promotion_id", "stock", "per_user_limit", "starts_at", "ends_at", "x"]),
        field_values | st.integers(),
        st.booleans(),
    )
).map(lambda d: json.dumps(d).encode())
payments = st.fixed_dictionaries(
    {
        "order_id": st.uuids().map(lambda u: f"{u.hex[:26]}.sku-p") | ids | hostile_text,
        "payment_id": ids | hostile_text,
    }
).map(lambda d: json.dumps(d).encode())
keys = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()) | hostile_text
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


class Harness:
    """One app on one event loop for every example of a test (Hypothesis calls the test body
    many times; a fixture per example would restart the app each time)."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.redis: Redis = self.run(self._redis(redis_url))
        self.run(self.redis.flushdb())  # before the start: the app seeds its runtime rules
        self.client: httpx.AsyncClient = self.run(self._start(redis_url))

    async def _redis(self, url: str) -> Redis:
        return Redis.from_url(url)

    async def _start(self, url: str) -> httpx.AsyncClient:
        cfg = Settings(
            redis_url=url,
            admin_token=ADMIN_TOKEN,
            payment_secret=SECRET,
            redis_timeout_ms=10_000,
            qps=1e9,
            burst=10**9,
            # every limit on (never reached) and the peer a trusted proxy: every request's
            # proxy headers are parsed and its user and address looked up
            user_qps=1e9,
            client_qps=1e9,
            trusted_proxies="127.0.0.0/8, ::1",
        )
        app = create_app(cfg, redis=self.redis)
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        return await self.stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://fg.test")
        )

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    def close(self) -> None:
        self.run(self.stack.aclose())
        self.run(self.redis.aclose())
        self.loop.close()

    def refused_changes_nothing(self, method: str, url: str, **kw: Any) -> httpx.Response:
        before = self.run(snapshot(self.redis))
        r: httpx.Response = self.run(self.client.request(method, url, **kw))
        event(
            f"{r.status_code} {r.json().get('error', '')}"
        )  # the spread, in --hypothesis-show-statistics
        assert r.status_code < 500, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        if r.status_code >= 400:
            assert set(r.json()) >= {"error", "message"}
            after = self.run(snapshot(self.redis))
            assert after == before, (r.status_code, r.text)
        return r


@pytest.fixture
def harness(redis_url: str) -> Iterator[Harness]:
    h = Harness(redis_url)
    body = {"promotion_id": "promo-p", "stock": 1_000_000, "per_user_limit": 1_000_000}
    assert (
        h.run(h.client.put("/api/v1/admin/skus/sku-p", json=body, headers=ADMIN)).status_code == 201
    )
    yield h
    h.run(h.redis.flushdb())
    h.close()


@EXAMPLES
@given(body=order_bodies(), key=keys, content_type=header_text | st.none())
def test_order_intake_never_fails_and_refusals_change_nothing(
    harness: Harness, body: bytes, key: str, content_type: str | None
) -> None:
    # any bytes a parser lets through (not CR, LF or NUL: HTTP/1.1 framing refuses those)
    raw_key = key.encode("utf-8").translate(None, b"\r\n\x00")
    headers: dict[str, str | bytes] = {"X-Idempotency-Key": raw_key}
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = harness.refused_changes_nothing(
        "POST", "/api/v1/order/create", content=body, headers=headers
    )
    assert r.status_code in (202, 400, 404, 409, 413, 422), r.text


@EXAMPLES
@given(order_id=hostile_text | ids | st.uuids().map(lambda u: f"{u.hex[:26]}.sku-p"))
def test_order_lookup_by_any_id(harness: Harness, order_id: str) -> None:
    path = "/api/v1/order/" + quote(order_id, safe="")
    r = harness.refused_changes_nothing("GET", path)
    assert r.status_code in (200, 400, 404, 405), r.text


@EXAMPLES
@given(body=payments | st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       signature=header_text | st.none(), sign_it=st.booleans())  # fmt: skip
def test_payment_callbacks_never_fail(
    harness: Harness, body: bytes, signature: str | None, sign_it: bool
) -> None:
    """Forged, missing and valid signatures over arbitrary bodies: a signed body that is not
    a payment of a real order is refused and changes nothing."""
    headers = {}
    if sign_it:
        headers["X-Signature"] = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    elif signature is not None:
        headers["X-Signature"] = signature
    r = harness.refused_changes_nothing(
        "POST", "/api/v1/payment/confirm", content=body, headers=headers
    )
    assert r.status_code in (400, 401, 404, 409, 413), r.text


@EXAMPLES
@given(body=sku_configs | order_bodies(),
       sku=st.just("sku-p") | ids | hostile_text,
       operator=st.sampled_from([None, "alice"]) | header_text)  # fmt: skip
def test_admin_writes_never_fail(
    harness: Harness, body: bytes, sku: str, operator: str | None
) -> None:
    headers = dict(ADMIN)
    if operator is not None:
        headers["X-Operator"] = operator
    path = "/api/v1/admin/skus/" + quote(sku, safe="")
    r = harness.refused_changes_nothing("PUT", path, content=body, headers=headers)
    assert r.status_code in (200, 201, 400, 404, 405, 409, 413), r.text


addresses = st.ip_addresses().map(str)
hops = (
    addresses
    | addresses.map(lambda a: f"[{a}]:443" if ":" in a else f"{a}:8080")
    | header_text
    | st.sampled_from(["unknown", "_hidden", "", " ", '"', "[::1", "1.2.3.4:x", "[::1]:", "::"])
)
forwarded_elements = st.builds(
    lambda hop, quoted, extra: f"{extra}for={chr(34) + hop + chr(34) if quoted else hop}",
    hops,
    st.booleans(),
    st.sampled_from(["", "proto=https;", "by=10.0.0.1;", "FOR=1.1.1.1;", ";;", "x"]),
)
proxy_headers = st.one_of(
    st.lists(hops, max_size=6).map(lambda hs: ("X-Forwarded-For", ", ".join(hs))),
    st.lists(forwarded_elements, max_size=4).map(lambda es: ("Forwarded", ", ".join(es))),
    st.tuples(st.sampled_from(["X-Forwarded-For", "Forwarded"]), header_text),
)
TRUSTED = "10.0.0.0/8, 2001:db8::/32, 192.0.2.1"


def scope_of(peer: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode("latin-1", "replace")) for k, v in headers]
    return {"client": (peer, 1234), "headers": raw}


@EXAMPLES
@given(peer=addresses | header_text, headers=st.lists(proxy_headers, max_size=3))
def test_any_proxy_headers_give_the_peer_or_an_address(
    peer: str, headers: list[tuple[str, str]]
) -> None:
    """Whatever the headers say, resolving never raises and answers the peer itself or one
    of the addresses the headers carry; from an untrusted peer, always the peer."""
    clients = ClientAddress(TRUSTED)
    found = clients.of(scope_of(peer, headers))
    if not clients.trusted_peer(peer):
        assert found == peer
    elif found != peer:
        ipaddress.ip_address(found)  # an address, in its canonical text
        assert parse_hop(found) == found
        carried = {
            str(parse_hop(hop))
            for _, value in headers
            for hop in [*value.split(","), *forwarded_for(value)]
        }
        assert found in carried


@EXAMPLES
@given(
    client=st.ip_addresses().filter(
        lambda a: (
            not ClientAddress(TRUSTED).trusted((AF_INET if a.version == 4 else AF_INET6, a.packed))
        )
    ),
    left=st.lists(hops, max_size=4),
    proxies=st.lists(
        st.sampled_from(["10.1.2.3", "192.0.2.1", "2001:db8::7", "10.0.0.9"]), max_size=3
    ),
    peer=st.sampled_from(["10.0.0.1", "192.0.2.1", "2001:db8::1"]),
    form=st.sampled_from(["xff", "forwarded"]),
)
def test_behind_trusted_proxies_the_client_is_the_right_most_untrusted_hop(
    client: Any, left: list[str], proxies: list[str], peer: str, form: str
) -> None:
    """The client's own address, then the proxies that appended theirs: whatever the client
    wrote before (left of) its address, the client is found."""
    chain = [*left, str(client), *proxies]
    if form == "xff":
        headers = [("X-Forwarded-For", ", ".join(chain))]
    else:
        headers = [("Forwarded", ", ".join(f'for="{h}"' for h in chain))]
    assert ClientAddress(TRUSTED).of(scope_of(peer, headers)) == parse_hop(str(client))


@EXAMPLES
@given(headers=st.lists(proxy_headers, min_size=1, max_size=3), user=ids)
def test_orders_with_any_proxy_headers_never_fail(
    harness: Harness, headers: list[tuple[str, str]], user: str
) -> None:
    body = {"user_id": user, "sku_id": "sku-p", "quantity": 1, "promotion_id": "promo-p"}
    sent = [(k, v.encode("latin-1", "replace")) for k, v in headers]
    sent.append(("X-Idempotency-Key", str(uuid.uuid4()).encode()))
    r = harness.refused_changes_nothing(
        "POST", "/api/v1/order/create", content=json.dumps(body).encode(), headers=sent
    )
    assert r.status_code == 202, r.text


rule_values = (
    st.integers(-5, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | json_values
)
rule_bodies = st.dictionaries(
    st.sampled_from(["qps", "burst", "breaker_rt_ms", "breaker_slow_ratio", "breaker_min_calls",
                     "breaker_window_ms", "breaker_open_s", "client_qps", "client_burst",
                     "user_qps", "user_burst", "nope", "QPS"]),
    rule_values,
    max_size=4,
).map(lambda d: json.dumps(d).encode()) | st.binary(max_size=60)  # fmt: skip


@EXAMPLES
@given(body=rule_bodies)
def test_rule_changes_never_fail(harness: Harness, body: bytes) -> None:
    r = harness.refused_changes_nothing("PUT", "/api/v1/admin/rules", content=body, headers=ADMIN)
    assert r.status_code in (200, 400), r.text
    harness.run(harness.client.put("/api/v1/admin/rules", json=RELAXED, headers=ADMIN))


RELAXED = {"qps": 1e9, "burst": 10**9, "user_qps": 1e9, "user_burst": 0, "client_qps": 1e9,
           "client_burst": 0, "breaker_rt_ms": 800, "breaker_slow_ratio": 0.5,
           "breaker_min_calls": 5, "breaker_window_ms": 1000, "breaker_open_s": 10}  # fmt: skip


def test_a_flood_of_keys_from_one_user_is_bounded_by_the_limit(harness: Harness) -> None:
    """500 distinct idempotency keys from one shopper at once: the per-user limit accepts 3,
    the rest are refused and leave nothing, so Redis holds 3 orders' worth of keys."""
    body = {"promotion_id": "promo-p", "stock": 1000, "per_user_limit": 3}
    harness.run(harness.client.put("/api/v1/admin/skus/sku-p", json=body, headers=ADMIN))
    order = {"user_id": "flood", "sku_id": "sku-p", "quantity": 1, "promotion_id": "promo-p"}

    async def flood() -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                harness.client.post(
                    "/api/v1/order/create",
                    json=order,
                    headers={"X-Idempotency-Key": str(uuid.uuid4())},
                )
                for _ in range(500)
            )
        )

    before = harness.run(harness.redis.dbsize())
    answers = harness.run(flood())
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 3 + [409] * 497
    assert {a.json()["error"] for a in answers if a.status_code == 409} == {"limit_exceeded"}
    one_order_keys = 3  # the order record, its idempotency record and its user-slot guard
    assert harness.run(harness.redis.dbsize()) - before <= 3 * one_order_keys + 4
