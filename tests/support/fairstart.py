"""A fair start's SKU in tests: pre-queued orders through the store, the start moved to now, a
finalizer drained; Spearman's rank correlation."""

from __future__ import annotations

import json
import time
import uuid

from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import keys
from gateway.store.inventory import Inventory
from gateway.store.outcomes import CreateResult
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer

WINDOW_S = 3600


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of two samples without ties."""
    n = len(xs)
    rx = {x: i for i, x in enumerate(sorted(xs))}
    ry = {y: i for i, y in enumerate(sorted(ys))}
    d2 = sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


class FairStart:
    """A SKU whose sale starts in an hour, pre-queue open now; `start()` moves its start to now
    (a later PUT keeps the draw and its seed), so the draw is due on the server's clock."""

    def __init__(self, redis: Redis, scripts: ScriptRegistry, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.inv = Inventory(redis, scripts, settings)
        self.fin = Finalizer(redis, scripts, settings, name="f1")
        self.fin.claim_every_s = 0.0
        self.starts_at = int(time.time()) + WINDOW_S // 2

    def cfg(self, stock: int, limit: int, starts_at: int) -> SkuConfig:
        return SkuConfig(
            promotion_id="p",
            stock=stock,
            per_user_limit=limit,
            starts_at=starts_at,
            prequeue_s=WINDOW_S,
        )

    async def sku(self, stock: int = 5, limit: int = 5) -> None:
        self.stock, self.limit = stock, limit
        await self.inv.configure_sku("s", self.cfg(stock, limit, self.starts_at))

    async def start(self) -> None:
        """The sale starts: its start moved to a second ago."""
        await self.inv.configure_sku("s", self.cfg(self.stock, self.limit, int(time.time()) - 1))
        self.fin._streams_read_at = -1e9  # its next step reads the SKUs (every second, else)

    async def order(
        self, user: str = "u1", qty: int = 1, *, key: str | None = None, queue_only: bool = False
    ) -> tuple[CreateResult, bytes]:
        req = OrderRequest(user_id=user, sku_id="s", quantity=qty, promotion_id="p")
        return await self.inv.create_order(req, key or str(uuid.uuid4()), queue_only=queue_only)

    async def prequeue(self, n: int, *, queue_only: bool = False) -> list[str]:
        """n pre-queued orders of distinct users, in arrival order."""
        ids = []
        for i in range(n):
            result, body = await self.order(f"u{i}", queue_only=queue_only)
            assert result is CreateResult.CREATED, body
            ids.append(json.loads(body)["order_id"])
        return ids

    async def drain(self) -> int:
        total = 0
        while handled := await self.fin.step(block=False):
            total += handled
        return total

    async def record(self, order_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.order_key(order_id) or "")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def seed(self) -> str:
        seed = await self.redis.hget(keys.SkuKeys("s").sku, "draw_seed")
        assert seed is not None
        return str(seed.decode())
