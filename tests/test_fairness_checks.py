"""The prequeue load test's fairness checks (loadtests/fairness.py) against a real server: a
fair start drawn and drained as it should be passes, and each planted fault is found: an order
after the start decided before a pre-queued one, the stock held by other than the draw's first,
a ranking that is not the pre-queue, an order after the start held while the draw rejected."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from gateway.store import keys
from loadtests import fairness
from tests.support.fairstart import FairStart


@pytest.fixture
def sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


async def test_a_fair_start_passes_and_each_planted_fault_is_found(
    fs: FairStart, sync: redis.Redis
) -> None:
    await fs.sku(stock=3, limit=1)
    early = await fs.prequeue(6)
    await fs.start()
    late = [json.loads((await fs.order(f"late{i}"))[1])["order_id"] for i in range(3)]
    await fs.drain()
    accepted = set(early + late)
    found = fairness.check(sync, "s", 3, accepted)
    assert found["problems"] == [], found
    assert (found["prequeued"], found["prequeued_held"]) == (6, 3)
    assert (found["after_start"], found["after_start_held"]) == (3, 0)
    assert found["first_after_start_decided_ms"] >= found["last_prequeued_decided_ms"]

    ranking = sync.lrange(keys.SkuKeys("s").draw, 0, -1)
    first, last, later = (keys.order_key(o) or "" for o in (ranking[0], ranking[-1], late[0]))

    def problems() -> list[str]:
        return list(fairness.check(sync, "s", 3, accepted)["problems"])

    # an order after the start decided a second before the last pre-queued one
    history = sync.hget(later, "history") or "[]"
    moved = json.loads(history)
    moved[-1]["at"] = found["last_prequeued_decided_ms"] - 1000
    sync.hset(later, "history", json.dumps(moved))
    assert any("before the last pre-queued" in p for p in problems())
    sync.hset(later, "history", history)
    # the stock went to a loser of the draw, not to its first
    sync.hset(first, "status", "REJECTED")
    sync.hset(last, "status", "HELD")
    assert any("not the first 3" in p for p in problems())
    sync.hset(first, "status", "HELD")
    sync.hset(last, "status", "REJECTED")
    # an order after the start held while the draw rejected pre-queued ones
    sync.hset(later, "status", "HELD")
    assert any("held while the draw rejected" in p for p in problems())
    sync.hset(later, "status", "REJECTED")
    # a ranking that is not the pre-queue
    sync.rpop(keys.SkuKeys("s").draw)
    assert any("is not the pre-queue" in p for p in problems())
    sync.rpush(keys.SkuKeys("s").draw, ranking[-1])
    assert problems() == []
