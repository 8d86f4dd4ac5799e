"""The runtime rules (`/api/v1/admin/rules`): two gateways on one real server (or the real
cluster), a change on one applied by the other within a second, kept across restarts,
validated (nothing applied on a bad request), versioned and recorded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from gateway.intake.rules import HISTORY_KEPT, NAMES
from gateway.settings import Settings
from gateway.store import calls
from gateway.transport.scripts import ScriptRegistry
from tests.support.api import ADMIN, Client, MakeClient, create, put_sku
from tests.support.state import BOTH_BACKENDS, snapshot

RULES = "/api/v1/admin/rules"
DEFAULTS = {n: getattr(Settings(), n) for n in NAMES}

pytestmark = BOTH_BACKENDS


def rules_of(view: dict[str, Any]) -> dict[str, Any]:
    return {n: view[n] for n in NAMES}


def applied(client: Client) -> dict[str, Any]:
    """What the app behind `client` applies now, read from its protections."""
    services = client._transport.app.state.services  # type: ignore[attr-defined]
    intake, breaker = services.intake, services.breaker
    return {
        "qps": intake.limiter.rate,
        "burst": intake.limiter.burst,
        "breaker_rt_ms": round(breaker.rt_s * 1000),
        "breaker_open_s": breaker.open_s,
        "user_qps": intake.keyed.user_rate,
        "client_qps": intake.keyed.client_rate,
    }


async def until(check: Any, within_s: float) -> float:
    """Seconds until `check()` is true; fails after `within_s`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within_s, "not within the time allowed"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_the_environment_seeds_the_rules_once(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_client(qps=300, user_qps=2)
    r = await a.get(RULES, headers=ADMIN)
    assert r.status_code == 200
    view = r.json()
    assert rules_of(view) == {**DEFAULTS, "qps": 300.0, "user_qps": 2.0}
    assert view["version"] == 0 and view["history"] == []
    assert "not the environment" not in caplog.text
    b = await make_client(qps=999, user_qps=0)  # another instance, other environment
    assert (await b.get(RULES, headers=ADMIN)).json() == view
    assert applied(b)["qps"] == 300.0 and applied(b)["user_qps"] == 2.0
    # and it says so: the environment's differing values are named
    said = [r.getMessage() for r in caplog.records if "not the environment" in r.getMessage()]
    assert said == [
        "runtime rules version 0 from Redis apply, not the environment: qps=300.0 "
        "(FLASHGATE_QPS=999), user_qps=2.0 (FLASHGATE_USER_QPS=0); change them with "
        "PUT /api/v1/admin/rules"
    ], said


async def test_a_change_on_one_gateway_is_applied_by_the_other_within_a_second(
    make_client: MakeClient,
) -> None:
    a, b = await make_client(), await make_client()
    change = {"qps": 250.5, "burst": 40, "breaker_rt_ms": 120, "breaker_open_s": 3, "user_qps": 1}
    r = await a.put(RULES, json=change, headers={**ADMIN, "X-Operator": "alice"})
    assert r.status_code == 200, r.text
    view = r.json()
    assert rules_of(view) == {**DEFAULTS, **change}
    assert view["version"] == 1
    expected = {**applied(a), **{k: float(v) for k, v in change.items() if k != "burst"}}
    expected["burst"] = 40
    expected["breaker_rt_ms"] = 120
    assert applied(a) == expected  # the gateway that took the change: at once
    await until(lambda: applied(b) == expected, within_s=1.0)
    assert (await b.get(RULES, headers=ADMIN)).json() == view


async def test_the_periodic_refresh_applies_a_change_whose_notice_was_lost(
    make_client: MakeClient, redis: Redis
) -> None:
    b = await make_client(mode_refresh_ms=200)
    assert applied(b)["qps"] == DEFAULTS["qps"]
    scripts = ScriptRegistry()
    await scripts.load_all(redis)
    rules = (await b.get(RULES, headers=ADMIN)).json()
    new = {**rules_of(rules), "qps": 77.0}
    call = calls.set_rules(
        expected_version=0,
        rules=msgspec.json.encode(new),
        channel="fg:nowhere",  # nobody listens: only the refresh can bring it
        history_kept=HISTORY_KEPT,
        by="script",
        client="",
    )
    await scripts["set_rules"](redis, *call)
    await until(lambda: applied(b)["qps"] == 77.0, within_s=1.0)


async def test_the_rules_survive_a_restart(make_client: MakeClient) -> None:
    a = await make_client()
    r = await a.put(RULES, json={"user_qps": 3, "user_burst": 4}, headers=ADMIN)
    assert r.status_code == 200
    view = r.json()
    restarted = await make_client(user_qps=0, user_burst=0)  # the environment says otherwise
    assert (await restarted.get(RULES, headers=ADMIN)).json() == view
    assert applied(restarted)["user_qps"] == 3.0
    await put_sku(restarted, stock=100, per_user_limit=100)
    statuses = [(await create(restarted, user_id="u1")).status_code for _ in range(6)]
    assert statuses == [202] * 4 + [429] * 2


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"qps": 0}', "$.qps"),
        (b'{"qps": -5}', "$.qps"),
        (b'{"qps": "fast"}', "$.qps"),
        (b'{"burst": 0}', "$.burst"),
        (b'{"burst": 2.5}', "$.burst"),
        (b'{"breaker_slow_ratio": 1.5}', "$.breaker_slow_ratio"),
        (b'{"breaker_min_calls": 0}', "$.breaker_min_calls"),
        (b'{"breaker_open_s": 0}', "$.breaker_open_s"),
        (b'{"client_qps": -1}', "$.client_qps"),
        (b'{"user_burst": true}', "$.user_burst"),
        (b'{"user_qps": null}', "$.user_qps"),
        (b'{"qps": 10, "speed": 1}', "speed"),  # unknown, beside a good value
        (b'{"user_qps": 5, "user_burst": -1}', "$.user_burst"),
        (b"[]", "object"),
        (b"{", "truncated"),
    ],
)
async def test_a_bad_change_is_400_naming_the_field_and_applies_nothing(
    make_client: MakeClient, redis: Redis, body: bytes, named: str
) -> None:
    a = await make_client()
    assert (await a.put(RULES, json={"burst": 50}, headers=ADMIN)).status_code == 200
    before_view = (await a.get(RULES, headers=ADMIN)).json()
    before_applied = applied(a)
    before = await snapshot(redis)
    r = await a.put(RULES, content=body, headers=ADMIN)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"
    assert named in r.json()["message"]
    assert await snapshot(redis) == before
    assert (await a.get(RULES, headers=ADMIN)).json() == before_view
    assert applied(a) == before_applied


async def test_each_change_is_versioned_and_recorded_newest_first(make_client: MakeClient) -> None:
    a = await make_client()
    first = (await a.get(RULES, headers=ADMIN)).json()
    t0 = int(time.time() * 1000)
    r1 = await a.put(RULES, json={"client_qps": 5}, headers={**ADMIN, "X-Operator": "alice"})
    same = await a.put(RULES, json={"client_qps": 5.0}, headers=ADMIN)  # changes nothing
    r2 = await a.put(RULES, json={"client_burst": 9, "qps": 10}, headers=ADMIN)
    t1 = int(time.time() * 1000)
    assert [r.status_code for r in (r1, same, r2)] == [200, 200, 200]
    assert same.json()["version"] == r1.json()["version"] == 1
    view = r2.json()
    assert view["version"] == 2
    second, earlier = view["history"]
    assert earlier["by"] == "alice" and second["by"] == "operator"
    assert earlier["client"] == second["client"] == "127.0.0.1"
    assert earlier["before"] == rules_of(first)
    assert earlier["after"] == second["before"] == {**rules_of(first), "client_qps": 5.0}
    assert second["after"] == rules_of(view)
    assert t0 <= earlier["at"] <= second["at"] <= t1


async def test_the_history_keeps_the_last_20(make_client: MakeClient) -> None:
    a = await make_client()
    for qps in range(1, 26):
        assert (await a.put(RULES, json={"qps": qps}, headers=ADMIN)).status_code == 200
    view = (await a.get(RULES, headers=ADMIN)).json()
    assert view["version"] == 25
    assert [h["after"]["qps"] for h in view["history"]] == list(range(25, 5, -1))


async def test_concurrent_changes_on_two_gateways_are_all_kept(make_client: MakeClient) -> None:
    a, b = await make_client(), await make_client()
    changes = [{"qps": 100 + i} if i % 2 else {"user_qps": i + 1} for i in range(12)]
    rs = await asyncio.gather(
        *((a if i % 2 else b).put(RULES, json=c, headers=ADMIN) for i, c in enumerate(changes))
    )
    assert all(r.status_code == 200 for r in rs)
    view = (await a.get(RULES, headers=ADMIN)).json()
    assert view["version"] == 12  # every change counted once, none lost to another
    history = view["history"][::-1]
    for older, newer in zip(history, history[1:], strict=False):
        assert newer["before"] == older["after"]  # one chain: no change overwrote another
    assert history[-1]["after"] == rules_of(view)


async def test_the_rules_need_the_admin_token(client: Client) -> None:
    assert (await client.get(RULES)).status_code == 401
    r = await client.put(RULES, json={"qps": 1}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert rules_of((await client.get(RULES, headers=ADMIN)).json()) == DEFAULTS
