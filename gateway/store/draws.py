"""A fair start's draw: the seed and its commitment, the ranking, the draw's two scripts and
what an auditor reads back.

The seed is 32 random bytes (`secrets`), chosen when a SKU is first configured with
`prequeue_s > 0` and kept in its hash; `draw_commitment` = sha256(seed bytes), hex, is shown
from then on, the seed only once the draw is done. An order's rank is the ascending order of
HMAC-SHA256(key=seed bytes, msg=order id as UTF-8), hex (ties, which need a hash collision,
by order id). Redis's Lua has no HMAC, so the drawer ranks in Python and decides in rank
order through `draw_decide.lua`, batch by batch, the cursor moved in the same step.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence

from gateway.schemas import DrawView
from gateway.store import calls, keys
from gateway.store.outcomes import DrawBatch, DrawOpened
from gateway.store.sending import Sender
from gateway.transport.replies import text
from gateway.transport.scripts import ScriptRegistry

SEED_BYTES = 32
SCAN_COUNT = 1000  # SSCAN's COUNT when reading a pre-queue


def new_seed() -> str:
    """A fresh draw seed, hex."""
    return secrets.token_bytes(SEED_BYTES).hex()


def commitment(seed: str) -> str:
    """sha256 of the seed's bytes, hex: published before the draw."""
    return hashlib.sha256(bytes.fromhex(seed)).hexdigest()


def rank_key(seed: bytes, order_id: str) -> str:
    """HMAC-SHA256(key=seed, msg=order_id), hex: what an order's rank sorts by."""
    return hmac.new(seed, order_id.encode(), hashlib.sha256).hexdigest()


def ranked(seed: str, order_ids: Iterable[str]) -> list[str]:
    """The order ids in rank order (rank 1 first)."""
    key = bytes.fromhex(seed)
    return sorted(order_ids, key=lambda oid: (rank_key(key, oid), oid))


def problems(
    view: DrawView,
    *,
    published: str | None = None,
    prequeued: set[str] | None = None,
) -> list[str]:
    """What is wrong with a revealed draw (empty: it checks out): the seed against the
    commitment (and the commitment the SKU view published, when given), every rank, and, when
    the pre-queue is known, that the draw ranked exactly its orders."""
    found: list[str] = []
    try:
        seed = bytes.fromhex(view.seed)
    except ValueError:
        return [f"the seed is not hex: {view.seed!r}"]
    if len(seed) != SEED_BYTES:
        found.append(f"the seed has {len(seed)} bytes, not {SEED_BYTES}")
    if hashlib.sha256(seed).hexdigest() != view.commitment:
        found.append("sha256(seed) is not the draw's commitment")
    if published is not None and published != view.commitment:
        found.append(f"the draw's commitment is not the one published before the sale, {published}")
    if len(set(view.orders)) != len(view.orders):
        found.append("an order is listed more than once")
    ranks = [rank_key(seed, oid) for oid in view.orders]
    for i in range(1, len(ranks)):
        if (ranks[i - 1], view.orders[i - 1]) > (ranks[i], view.orders[i]):
            found.append(f"rank {i + 1} ({view.orders[i]}) sorts before rank {i}")
            break
    if prequeued is not None and prequeued != set(view.orders):
        missing, extra = len(prequeued - set(view.orders)), len(set(view.orders) - prequeued)
        found.append(f"the draw misses {missing} pre-queued order(s) and has {extra} other(s)")
    return found


class Draws:
    """The draw's scripts and reads. Every Redis failure leaves as BackendUnavailable."""

    def __init__(self, send: Sender, scripts: ScriptRegistry) -> None:
        self.send = send
        self.redis = send.redis
        self._open = scripts["draw_open"]
        self._decide = scripts["draw_decide"]

    async def open(self, sku_id: str, *, now_ms: int | None = None) -> DrawOpened:
        """Open the SKU's draw once its sale started (the pre-queue closes), or see where an
        open one stands."""
        call = calls.draw_open(keys.SkuKeys(sku_id), now_ms=now_ms)
        return DrawOpened.of(await self.send.script(self._open, *call))

    async def decide(
        self,
        sku_id: str,
        cursor: int,
        order_ids: Sequence[str],
        *,
        hold_ttl_ms: int,
        now_ms: int | None = None,
    ) -> DrawBatch:
        """Decide one batch from `cursor`: the outcome, the draw's cursor after it, the
        batch's orders decided HELD and REJECTED."""
        sk = keys.SkuKeys(sku_id)
        call = calls.draw_decide(
            sk,
            cursor=cursor,
            hold_ttl_ms=hold_ttl_ms,
            now_ms=now_ms,
            orders_prefix=sk.orders_prefix,
            order_ids=order_ids,
        )
        return DrawBatch.of(await self.send.script(self._decide, *call))

    async def duration_s(self, sku_id: str) -> float | None:
        """Seconds from the draw's opening to its end (None while it is not done)."""
        opened, drawn = await self.send.run(
            self.redis.hmget(keys.SkuKeys(sku_id).sku, "draw_opened_at", "drawn_at")
        )
        if opened is None or drawn is None:
            return None
        return max(0.0, (int(drawn) - int(opened)) / 1000)

    async def prequeued(self, sku_id: str) -> set[str]:
        """The SKU's pre-queued order ids (a frozen set once its draw is open)."""
        found: set[str] = set()
        redis, key = self.redis, keys.SkuKeys(sku_id).prequeue
        cursor = 0
        while True:
            cursor, batch = await self.send.run(redis.sscan(key, cursor, count=SCAN_COUNT))
            found.update(text(m) for m in batch)
            if not cursor:
                return found

    async def state(self, sku_id: str) -> tuple[bool, str | None, str | None]:
        """(the SKU exists, its draw's state or None, its published commitment or None)."""
        sk = keys.SkuKeys(sku_id)
        promotion, draw, published = await self.send.run(
            self.redis.hmget(sk.sku, "promotion_id", "draw", "draw_commitment")
        )
        return (
            promotion is not None,
            None if draw is None else text(draw),
            None if published is None else text(published),
        )

    async def view(self, sku_id: str) -> DrawView | None:
        """The revealed draw, or None when it is not done."""
        sk = keys.SkuKeys(sku_id)
        draw, seed, committed = await self.send.run(
            self.redis.hmget(sk.sku, "draw", "draw_seed", "draw_commitment")
        )
        if draw != b"done" or seed is None or committed is None:
            return None
        orders = await self.send.run(self.redis.lrange(sk.draw, 0, -1))
        return DrawView(
            sku_id=sku_id,
            seed=text(seed),
            commitment=text(committed),
            orders=[text(o) for o in orders],
        )
