"""Runtime rules and client limits end to end: two real `flashgate serve` instances (one with
two workers) on one real server. A change made on one is applied by every worker of both
within a second and after a restart; a bad change changes nothing; proxy headers count only
from a trusted peer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.api import ADMIN
from tests.support.processes import Serve

pytestmark = pytest.mark.integration
RULES = "/api/v1/admin/rules"


@pytest.fixture
def instances(redis: Redis, redis_url: str, tmp_path: Path) -> Iterator[list[Serve]]:
    """Started instances, stopped at the end (the `redis` fixture flushed the server)."""
    started: list[Serve] = []
    yield started
    for serve in started:
        if serve.proc.poll() is None:
            assert serve.stop() == 0


def start(instances: list[Serve], where: Path, redis_url: str, *flags: str, **env: str) -> Serve:
    serve = Serve(where, *flags, env={"REDIS_URL": redis_url, **env})
    instances.append(serve)
    return serve


def orders(base: str, user: str, n: int, xff: str | None = None) -> list[int]:
    headers = {} if xff is None else {"X-Forwarded-For": xff}
    body = {"user_id": user, "sku_id": "s", "quantity": 1, "promotion_id": "p"}
    got = []
    for _ in range(n):
        key = {"X-Idempotency-Key": str(uuid.uuid4())}
        r = httpx.post(f"{base}/api/v1/order/create", json=body, headers={**headers, **key})
        got.append(r.status_code)
    return got


def applied_versions(base: str) -> list[int]:
    """The rules version each worker of an instance applies (`/metrics`, one line per pid)."""
    text = httpx.get(f"{base}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("flashgate_rules_version{")]
    return sorted(int(float(line.rsplit(" ", 1)[1])) for line in lines)


@pytest.mark.timeout(120)
def test_two_instances_apply_a_change_within_a_second_and_after_a_restart(
    instances: list[Serve], redis_url: str, tmp_path: Path
) -> None:
    a = start(instances, tmp_path / "a", redis_url, "--workers", "2")
    b = start(instances, tmp_path / "b", redis_url, FLASHGATE_USER_QPS="0")
    sku = {"promotion_id": "p", "stock": 1000, "per_user_limit": 1000}
    assert httpx.put(f"{a.base}/api/v1/admin/skus/s", json=sku, headers=ADMIN).status_code == 201
    assert orders(b.base, "early", 5) == [202] * 5  # no limit yet

    r = httpx.put(f"{a.base}{RULES}", json={"user_qps": 0.01, "user_burst": 3}, headers=ADMIN)
    changed = time.monotonic()
    assert r.status_code == 200 and r.json()["version"] == 1
    time.sleep(max(0.0, 1.0 - (time.monotonic() - changed)))  # the contract's second
    assert orders(b.base, "u-b", 4) == [202, 202, 202, 429]
    # both workers of A apply it, and share each user's budget: 3 in all, not 3 each
    assert orders(a.base, "u-a", 8) == [202] * 3 + [429] * 5
    assert applied_versions(a.base) == [1, 1]  # each worker's flashgate_rules_version

    bad = httpx.put(f"{b.base}{RULES}", json={"user_burst": -2}, headers=ADMIN)
    assert bad.status_code == 400 and "user_burst" in bad.json()["message"]
    view = httpx.get(f"{a.base}{RULES}", headers=ADMIN).json()
    assert view["version"] == 1 and view["user_burst"] == 3

    assert b.stop() == 0
    b2 = start(instances, tmp_path / "b2", redis_url, FLASHGATE_USER_QPS="0")  # env: off
    assert httpx.get(f"{b2.base}{RULES}", headers=ADMIN).json() == view
    assert orders(b2.base, "u-b2", 4) == [202, 202, 202, 429]


@pytest.mark.timeout(120)
def test_forwarded_for_counts_only_from_a_trusted_proxy(
    instances: list[Serve], redis_url: str, tmp_path: Path
) -> None:
    direct = start(instances, tmp_path / "direct", redis_url)
    behind = start(instances, tmp_path / "behind", redis_url, FLASHGATE_TRUSTED_PROXIES="127.0.0.1")
    sku = {"promotion_id": "p", "stock": 1000, "per_user_limit": 1000}
    assert (
        httpx.put(f"{direct.base}/api/v1/admin/skus/s", json=sku, headers=ADMIN).status_code == 201
    )
    rules = {"client_qps": 0.01, "client_burst": 2}
    assert httpx.put(f"{behind.base}{RULES}", json=rules, headers=ADMIN).status_code == 200
    time.sleep(1.0)  # every instance applies it within a second

    # not trusted there: three "addresses" are one peer, 127.0.0.1
    spoofed = [orders(direct.base, f"d{i}", 1, xff=f"203.0.113.{i}")[0] for i in range(3)]
    assert spoofed == [202, 202, 429]
    # behind a trusted proxy each address has its own budget
    real = [orders(behind.base, f"b{i}", 1, xff=f"203.0.113.{i}")[0] for i in range(3)]
    assert real == [202, 202, 202]
    assert orders(behind.base, "b9", 2, xff="198.51.100.1, 203.0.113.1") == [202, 429]
