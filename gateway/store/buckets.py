"""Hot-SKU stock buckets (docs/cluster/buckets.md): one SKU's stock split over K buckets in
different slots, so one hot SKU is not capped by one shard.

A shopper always orders from one bucket (`keys.bucket_of`), so the per-user limit and the
idempotency record stay in one slot. When that bucket has too little, the gateway moves stock
into it from the others before answering `sold_out`: `take_stock.lua` takes units out of a
donor and journals the transfer there, `give_stock.lua` adds them to the bucket once per
transfer id, then the journal entry is dropped. A mover that dies in between leaves a journal
entry the sweeper completes. Every step keeps stock == available + held + sold in its bucket;
units in a transfer are counted by the journal until received.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import calls, keys
from gateway.store.outcomes import Taken
from gateway.transport.connect import Client
from gateway.transport.replies import text
from gateway.transport.scripts import Executor, ScriptRegistry

log = logging.getLogger("flashgate")

RECEIVED_KEPT_MS = 7 * 86_400_000  # how long a bucket remembers a transfer id it received
QUIET_LOOKS = 10  # looks at the other buckets until one finds them quiet (waits 2, 4, ... ms)
IN_FLIGHT_WAIT_S = 0.002


class Layouts:
    """How many buckets each SKU has (fixed when the SKU is created), cached per process."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis
        self.counts: dict[str, int] = {}  # sku_id -> bucket count, once read
        self._tags: dict[str, list[str]] = {}

    def known(self, sku_id: str) -> int | None:
        """The cached bucket count (no round trip), None when not read yet."""
        return self.counts.get(sku_id)

    async def count(self, sku_id: str) -> int | None:
        """The SKU's bucket count, None for a SKU not configured (not cached: it may be soon)."""
        count = self.counts.get(sku_id)
        if count is not None:
            return count
        sk = keys.SkuKeys(sku_id)
        promotion, buckets = await self.redis.hmget(sk.sku, "promotion_id", "buckets")
        if promotion is None:
            return None
        count = self.counts[sku_id] = int(buckets or 1)
        return count

    def remember(self, sku_id: str, count: int) -> None:
        self.counts[sku_id] = count

    def tags(self, sku_id: str, count: int) -> list[str]:
        tags = self._tags.get(sku_id)
        if tags is None or len(tags) != count:
            tags = self._tags[sku_id] = keys.bucket_tags(sku_id, count)
        return tags

    async def all_tags(self, sku_id: str) -> list[str]:
        """Every bucket tag of the SKU (just the SKU for one not bucketed or not configured)."""
        count = await self.count(sku_id)
        return self.tags(sku_id, count or 1)

    async def every_bucket(
        self, sku_ids: Sequence[str] | None = None
    ) -> list[tuple[str, int, str]]:
        """(sku_id, bucket, tag) of every stock bucket of `sku_ids` (every registered SKU by
        default, sorted), the SKU's own tag first: where its streams are."""
        if sku_ids is None:
            members: set[bytes] = await self.redis.smembers(keys.SKU_REGISTRY)  # type: ignore[assignment]
            sku_ids = sorted(text(m) for m in members)
        return [
            (sku_id, bucket, tag)
            for sku_id in sku_ids
            for bucket, tag in enumerate(await self.all_tags(sku_id))
        ]


@dataclass(frozen=True, slots=True)
class Transfer:
    transfer_id: str
    units: int
    to_tag: str
    at_ms: int


def journal(raw: Mapping[Any, Any]) -> list[Transfer]:
    """A bucket's transfers hash, decoded (see lua/take_stock.lua)."""
    out = []
    for tid, value in raw.items():
        units, to_tag, at = text(value).split("\n")
        out.append(Transfer(text(tid), int(units), to_tag, int(at)))
    return out


class Mover:
    """Moves available stock between the buckets of one SKU."""

    def __init__(self, client: Executor, scripts: ScriptRegistry) -> None:
        self.client = client
        self._take = scripts["take_stock"]
        self._give = scripts["give_stock"]
        self.moved = 0

    async def refill(self, tags: list[str], to: int, need: int) -> int:
        """Move up to `need` units into bucket `to` from the others; returns the units moved.
        0 means a look at every other bucket found nothing, with no transfer in flight and
        none landing since the look before (a transfer that lands in a bucket already looked
        at would otherwise hide stock from this look). -1: the looks never went quiet (stock
        kept moving, or a transfer stayed in flight): nothing can be said yet."""
        landed = -1
        for attempt in range(QUIET_LOOKS):
            moved, in_flight, arrivals = await self._refill_once(tags, to, need)
            if moved:
                return moved
            if not in_flight and arrivals == landed:
                return 0
            landed = arrivals
            if in_flight:
                await asyncio.sleep(IN_FLIGHT_WAIT_S * (attempt + 1))
        return -1

    async def _refill_once(self, tags: list[str], to: int, need: int) -> tuple[int, int, int]:
        moved = in_flight = arrivals = 0
        count = len(tags)
        for step in range(1, count):
            donor = keys.SkuKeys(tags[(to + step) % count])
            transfer_id = secrets.token_hex(8)
            take = calls.take_stock(
                donor, transfer_id=transfer_id, units=need - moved, to_tag=tags[to], now_ms=None
            )
            taken = Taken.of(await self._take(self.client, *take))
            in_flight += taken.in_flight
            arrivals += taken.received
            if not taken.units:
                continue
            await self.complete(donor, Transfer(transfer_id, taken.units, tags[to], 0))
            moved += taken.units
            if moved >= need:
                break
        self.moved += moved
        return moved, in_flight, arrivals

    async def move(self, from_tag: str, to_tag: str, units: int) -> int:
        """Move up to `units` available units from one bucket to another (a journaled
        transfer); returns the units moved."""
        donor = keys.SkuKeys(from_tag)
        transfer_id = secrets.token_hex(8)
        take = calls.take_stock(
            donor, transfer_id=transfer_id, units=units, to_tag=to_tag, now_ms=None
        )
        taken = Taken.of(await self._take(self.client, *take)).units
        if taken:
            await self.complete(donor, Transfer(transfer_id, taken, to_tag, 0))
        return taken

    async def complete(self, donor: keys.SkuKeys, transfer: Transfer) -> None:
        """Give a journaled transfer's units to its bucket (once), then drop the entry."""
        give = calls.give_stock(
            keys.SkuKeys(transfer.to_tag),
            transfer_id=transfer.transfer_id,
            units=transfer.units,
            now_ms=None,
            received_kept_ms=RECEIVED_KEPT_MS,
        )
        await self._give(self.client, *give)  # Given: now or before, the units are there
        await self.client.execute_command("HDEL", donor.transfers, transfer.transfer_id)

    async def complete_stale(self, redis: Client, tag: str, stale_ms: int) -> int:
        """Complete the transfers out of one bucket whose mover stopped halfway (journaled
        more than `stale_ms` ago); returns how many."""
        donor = keys.SkuKeys(tag)
        now_ms = int(time.time() * 1000)
        done = 0
        for transfer in journal(await redis.hgetall(donor.transfers)):
            if now_ms - transfer.at_ms >= stale_ms:
                await self.complete(donor, transfer)
                log.warning(
                    "completed a stock transfer of %d unit(s) from %s to %s left halfway",
                    transfer.units,
                    tag,
                    transfer.to_tag,
                )
                done += 1
        return done
