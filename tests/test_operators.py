"""The operator audit: who changed a SKU or the mode, when, from where and what; the log lines
of changes; the rate-limited log of refused credentials. Against the real server."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.store import keys
from gateway.web.operators import RefusalLog
from tests.support.api import ADMIN, ADMIN_TOKEN, Client, MakeClient, create, put_sku
from tests.support.state import BOTH_BACKENDS, Clock, snapshot

SWITCH = "/api/v1/order/switch"
CHANGES = "/api/v1/admin/skus/sku-42/changes"


pytestmark = BOTH_BACKENDS


def as_operator(name: str) -> dict[str, str]:
    return {**ADMIN, "X-Operator": name}


def window(**values: Any) -> dict[str, Any]:
    """A SKU's settings as a change shows them (the conftest put_sku defaults)."""
    base: dict[str, Any] = {
        "promotion_id": "promo-1",
        "stock": 10,
        "per_user_limit": 5,
        "starts_at": None,
        "ends_at": None,
        "prequeue_s": 0,
    }
    return {**base, **values}


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("refused")
    ]


async def test_the_change_log_records_who_when_and_what(client: Client) -> None:
    t0 = int(time.time() * 1000)
    body = {"promotion_id": "promo-1", "stock": 10, "per_user_limit": 5}
    url = "/api/v1/admin/skus/sku-42"
    assert (await client.put(url, json=body, headers=as_operator("alice"))).status_code == 201
    await create(client, quantity=2)
    update = {**body, "stock": 12, "starts_at": 100, "ends_at": 200}
    assert (await client.put(url, json=update, headers=ADMIN)).status_code == 200  # no name
    t1 = int(time.time() * 1000)

    r = await client.get(CHANGES, headers=ADMIN)
    assert r.status_code == 200
    view = r.json()
    assert view["sku_id"] == "sku-42"
    updated, created = view["changes"]  # newest first
    assert created == {
        "id": created["id"],
        "at": created["at"],
        "by": "alice",
        "client": "127.0.0.1",  # httpx's ASGI transport: the peer address
        "action": "created",
        "before": None,
        "after": window(),
    }
    assert updated == {
        "id": updated["id"],
        "at": updated["at"],
        "by": "operator",  # the default without X-Operator
        "client": "127.0.0.1",
        "action": "updated",
        "before": window(),
        "after": window(stock=12, starts_at=100, ends_at=200),
    }
    assert t0 - 1000 <= created["at"] <= updated["at"] <= t1 + 1000
    assert updated["id"] > created["id"]
    # The figures held by the order did not leak into the log: it records configuration only.
    newest = (await client.get(CHANGES, params={"limit": 1}, headers=ADMIN)).json()
    assert newest["changes"] == [updated]


async def test_a_refused_change_records_nothing(client: Client, redis: Redis) -> None:
    await put_sku(client, stock=5)
    await create(client, quantity=3)
    before = await snapshot(redis)
    r = await client.put(
        "/api/v1/admin/skus/sku-42",
        json={"promotion_id": "promo-1", "stock": 2, "per_user_limit": 5},
        headers=as_operator("mallory"),
    )
    assert (r.status_code, r.json()["error"]) == (409, "stock_below_committed")
    assert await snapshot(redis) == before
    assert len((await client.get(CHANGES, headers=ADMIN)).json()["changes"]) == 1


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"bob smith",
        b"{sku-42}",
        b"ops*",
        b'a"b',
        b"a\\b",
        b"o" * 65,
        "\u00fc".encode("latin-1"),
        b"ops\x00",
    ],
)
async def test_a_malformed_operator_is_400_and_changes_nothing(
    client: Client, redis: Redis, name: bytes
) -> None:
    await put_sku(client)
    before = await snapshot(redis)
    headers = [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode()), (b"x-operator", name)]
    body = {"promotion_id": "promo-1", "stock": 99, "per_user_limit": 1}
    r = await client.put("/api/v1/admin/skus/sku-42", json=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert "X-Operator" in r.json()["message"]
    r = await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert await snapshot(redis) == before


async def test_two_operator_headers_are_400(client: Client, redis: Redis) -> None:
    before = await snapshot(redis)
    headers = [
        (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
        (b"x-operator", b"alice"),
        (b"x-operator", b"bob"),
    ]
    r = await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert await snapshot(redis) == before


async def test_the_token_is_checked_before_the_operator(client: Client) -> None:
    r = await client.post(SWITCH, params={"mode": "NORMAL"}, headers={"X-Operator": "a b"})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")


async def test_the_changes_endpoint(client: Client) -> None:
    r = await client.get(CHANGES)
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    r = await client.get(CHANGES, headers=ADMIN)
    assert (r.status_code, r.json()["error"]) == (404, "unknown_sku")
    r = await client.get("/api/v1/admin/skus/a{b}/changes", headers=ADMIN)
    assert r.status_code == 400
    for stock in range(1, 26):
        await put_sku(client, stock=stock)
    for limit in ("0", "101", "-1", "x", "1.5", "", "1000"):
        r = await client.get(CHANGES, params={"limit": limit}, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), limit
    default = (await client.get(CHANGES, headers=ADMIN)).json()["changes"]
    assert [c["after"]["stock"] for c in default] == list(range(25, 5, -1))
    everything = await client.get(CHANGES, params={"limit": 100}, headers=ADMIN)
    changes = everything.json()["changes"]
    assert len(changes) == 25 and changes[-1]["action"] == "created"
    assert all(c["action"] == "updated" for c in changes[:-1])


async def test_a_sku_configured_before_the_log_existed_has_no_changes(
    client: Client, redis: Redis
) -> None:
    await put_sku(client)
    await redis.delete(keys.SkuKeys("sku-42").changes)
    r = await client.get(CHANGES, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"sku_id": "sku-42", "changes": []}


async def test_the_switch_history_records_who_and_from_where(client: Client) -> None:
    r = await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=as_operator("alice"))
    assert r.status_code == 200
    await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=as_operator("bob"))  # no-op
    await client.post(SWITCH, params={"mode": "NORMAL"}, headers=ADMIN)
    view = (await client.get(SWITCH, headers=ADMIN)).json()
    back, first = view["history"]
    assert first == {
        "from": "NORMAL",
        "to": "QUEUE_ONLY",
        "at": first["at"],
        "by": "alice",
        "client": "127.0.0.1",
    }
    assert (back["from"], back["to"], back["by"], back["client"]) == (
        "QUEUE_ONLY",
        "NORMAL",
        "operator",
        "127.0.0.1",
    )
    assert back["at"] == view["changed_at"]


async def test_every_change_is_one_log_line_without_the_token(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashgate")
    url = "/api/v1/admin/skus/sku-42"
    body = {"promotion_id": "promo-1", "stock": 3, "per_user_limit": 1, "starts_at": 100}
    await client.put(url, json=body, headers={**as_operator("alice"), "X-Other": "secret-x"})
    await client.put(url, json={**body, "stock": 4}, headers=as_operator("alice"))
    await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=as_operator("bob"))
    await client.post(SWITCH, params={"mode": "QUEUE_ONLY"}, headers=as_operator("bob"))
    await client.get(url, headers=ADMIN)  # reads are not changes
    await client.get(SWITCH, headers=ADMIN)
    # INFO only: a watcher may log the mode it re-read at WARNING, depending on timing.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        "operator alice from 127.0.0.1: sku sku-42 created: promotion_id=promo-1 stock=3 "
        "per_user_limit=1 starts_at=100 ends_at=none",
        "operator alice from 127.0.0.1: sku sku-42 updated: promotion_id=promo-1 stock=4 "
        "per_user_limit=1 starts_at=100 ends_at=none",
        "operator bob from 127.0.0.1: mode switched: previous=NORMAL mode=QUEUE_ONLY",
        "operator bob from 127.0.0.1: mode switch (already in force, nothing changed): "
        "mode=QUEUE_ONLY",
    ]
    assert ADMIN_TOKEN not in caplog.text and "secret-x" not in caplog.text


async def test_refused_admin_calls_are_logged_at_most_once_per_interval(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashgate")
    wrong = {"Authorization": "Bearer guess-1", "X-Operator": "eve"}
    for _ in range(5):
        assert (await client.get(SWITCH, headers=wrong)).status_code == 401
        r = await client.put("/api/v1/admin/skus/s", json={}, headers=wrong)
        assert r.status_code == 401
    assert refusal_lines(caplog) == [
        "refused admin calls (401 unauthorized): 1 since the last report, the last from 127.0.0.1"
    ]
    assert "guess-1" not in caplog.text and "eve" not in caplog.text


async def test_refused_signatures_are_logged_apart_from_admin_calls(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    c = await make_client(payment_secret="s3cret")
    caplog.set_level(logging.INFO, logger="flashgate")
    body = b'{"order_id": "x", "payment_id": "p"}'
    forged = hmac.new(b"guess", body, hashlib.sha256).hexdigest()
    for _ in range(3):
        r = await c.post("/api/v1/payment/confirm", content=body, headers={"X-Signature": forged})
        assert r.status_code == 401
    assert (await c.get(SWITCH)).status_code == 401
    assert refusal_lines(caplog) == [
        "refused payment signatures (401 bad_signature): 1 since the last report, "
        "the last from 127.0.0.1",
        "refused admin calls (401 unauthorized): 1 since the last report, the last from 127.0.0.1",
    ]
    assert forged not in caplog.text and "s3cret" not in caplog.text


class TestRefusalLog:
    def make(self, clock: Clock) -> tuple[RefusalLog, list[str]]:
        lines: list[str] = []

        class Sink(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(f"{record.levelname} {record.getMessage()}")

        logger = logging.getLogger("flashgate.test-refusals")
        logger.propagate = False
        logger.handlers = [Sink()]
        return RefusalLog("things", interval_s=10, clock=clock, logger=logger), lines

    def test_first_at_once_then_one_line_per_interval_with_the_count(self, clock: Clock) -> None:
        refusals, lines = self.make(clock)
        assert refusals.refused("10.0.0.1") is True
        assert lines == ["WARNING refused things: 1 since the last report, the last from 10.0.0.1"]
        for i in range(2, 6):
            clock.now += 2  # 8 s after the first line: still within the interval
            assert refusals.refused(f"10.0.0.{i}") is False
        assert len(lines) == 1 and refusals.count == 4
        clock.now += 2  # 10 s: the next refusal reports all that came since
        assert refusals.refused("::1") is True
        assert lines[-1] == "WARNING refused things: 5 since the last report, the last from ::1"
        assert refusals.count == 0
        clock.now += 9.9
        assert refusals.refused("") is False  # the interval runs from the last line

    def test_flush_reports_what_is_left_and_nothing_twice(self, clock: Clock) -> None:
        refusals, lines = self.make(clock)
        refusals.flush()
        assert lines == []
        refusals.refused("10.0.0.1")
        refusals.flush()  # nothing counted since the line
        assert len(lines) == 1
        clock.now += 1
        refusals.refused("10.0.0.2")
        refusals.refused("")
        refusals.flush()
        assert lines[-1] == (
            "WARNING refused things: 2 since the last report, the last from unknown"
        )
        clock.now += 1
        assert refusals.refused("10.0.0.3") is False  # a flush line starts an interval too
