"""Stampedes against the real server: exact stock, one order per key, the per-user limit."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

from redis.asyncio import Redis

from gateway.ops.audit import audit
from gateway.settings import Settings
from tests.support.api import ADMIN, Client, create, put_sku
from tests.support.state import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


async def figures(client: Client, sku_id: str = "sku-42") -> tuple[int, int, int, int]:
    v = (await client.get(f"/api/v1/admin/skus/{sku_id}", headers=ADMIN)).json()
    return v["stock"], v["available"], v["held"], v["sold"]


async def test_2000_shoppers_on_stock_50(client: Client, redis: Redis) -> None:
    await put_sku(client, stock=50, per_user_limit=1)
    answers = await asyncio.gather(*(create(client, user_id=f"u{i}") for i in range(2000)))
    codes = Counter((r.status_code, r.json().get("error")) for r in answers)
    assert codes == {(202, None): 50, (409, "sold_out"): 1950}
    assert await figures(client) == (50, 0, 50, 0)
    held_ids = {r.json()["order_id"] for r in answers if r.status_code == 202}
    assert len(held_ids) == 50
    stream = await redis.xrange("fg:{sku-42}:stream")
    assert {e[1][b"order_id"].decode() for e in stream} == held_ids


async def test_repeated_clicks_with_one_key_give_one_order(client: Client) -> None:
    await put_sku(client, stock=100, per_user_limit=100)
    keys = [str(uuid.uuid4()) for _ in range(20)]
    # 20 shoppers, each tapping 10 times at once with their own key
    answers = await asyncio.gather(
        *(create(client, k, user_id=f"u{i}") for i, k in enumerate(keys) for _ in range(10))
    )
    assert {r.status_code for r in answers} == {202}
    by_key: dict[str, set[bytes]] = {}
    for r in answers:
        by_key.setdefault(r.json()["order_id"], set()).add(r.content)
    assert len(by_key) == 20
    assert all(len(bodies) == 1 for bodies in by_key.values())  # byte for byte
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 180
    assert await figures(client) == (100, 80, 20, 0)


async def test_per_user_limit_under_concurrency(client: Client) -> None:
    await put_sku(client, stock=1000, per_user_limit=3)
    answers = await asyncio.gather(*(create(client, user_id="scalper") for _ in range(200)))
    codes = Counter((r.status_code, r.json().get("error")) for r in answers)
    assert codes == {(202, None): 3, (409, "limit_exceeded"): 197}
    assert await figures(client) == (1000, 997, 3, 0)


async def test_mixed_quantities_never_oversell(client: Client, settings: Settings) -> None:
    await put_sku(client, stock=97, per_user_limit=10)
    answers = await asyncio.gather(
        *(create(client, user_id=f"u{i}", quantity=1 + i % 7) for i in range(400))
    )
    held = sum(r.json()["quantity"] for r in answers if r.status_code == 202)
    stock, available, held_units, _ = await figures(client)
    assert held == held_units and available == stock - held
    assert available < 7  # every refusal was for lack of stock, so at most 6 units remain
    assert await audit(settings) == 0
