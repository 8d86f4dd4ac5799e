"""Talking to the gateway in tests: the admin token, SKU and order helpers over httpx."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

ADMIN_TOKEN = "test-admin-token"


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


Client = httpx.AsyncClient


MakeClient = Callable[..., Awaitable[Client]]


async def put_sku(client: Client, sku_id: str = "sku-42", **cfg: Any) -> httpx.Response:
    body = {"promotion_id": "promo-1", "stock": 10, "per_user_limit": 5, **cfg}
    return await client.put(f"/api/v1/admin/skus/{sku_id}", json=body, headers=ADMIN)


def order_body(**fields: Any) -> dict[str, Any]:
    return {"user_id": "u1", "sku_id": "sku-42", "quantity": 1, "promotion_id": "promo-1", **fields}


async def create(client: Client, key: str | None = None, **fields: Any) -> httpx.Response:
    headers = {"X-Idempotency-Key": key or str(uuid.uuid4())}
    return await client.post("/api/v1/order/create", json=order_body(**fields), headers=headers)
