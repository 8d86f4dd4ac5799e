"""Every Redis key flashgate uses. Key prefixes live here and nowhere else.

Keys that one script touches share the SKU's hash tag `{<sku_id>}`, so every script is
confined to one Redis Cluster slot. IDs are restricted to `[A-Za-z0-9_.:-]` by the schemas,
so they can never open or close a hash tag, add a separator or form a glob.

A hot SKU may be split into K stock buckets (docs/cluster/buckets.md). Bucket 0 is the SKU's
own tag `{S}`; bucket b >= 1 has the tag `{S~b~n}` (`~` is never in an ID), n chosen so the
buckets' slots spread evenly over the slot space. Each bucket has every per-SKU key below
under its own tag; the order id names its bucket's tag.

| key | type | holds |
| --- | --- | --- |
| `fg:skus` | set | every configured sku_id (read by audit, sweeper, finalizers) |
| `fg:draws` | set | sku_ids with a fair start whose draw may not be done (read by finalizers) |
| `fg:{S}:sku` | hash | SKU config and counters: stock available held sold ... |
| `fg:{S}:users` | hash | user_id -> units the user holds or bought of S |
| `fg:{S}:holds` | zset | order_id -> hold deadline (epoch ms), the sweeper's index |
| `fg:{S}:stream` | stream | orders of S for the finalizers |
| `fg:{S}:o:<rand>` | hash | the order record |
| `fg:{S}:idem:<user>:<key>` | string | request fingerprint, order id, hold deadline (24 h) |
| `fg:{S}:events` | stream | outbound: every final state with the order record (ERP/WMS) |
| `fg:{S}:dead` | stream | dead letters: order-stream entries that failed repeatedly, with reason |
| `fg:{S}:relay-dead` | stream | relay dead letters: events a target kept refusing, with reason |
| `fg:{S}:pay:<payment_id>` | hash | order_id, at, applied: one payment confirmation |
| `fg:{S}:accepted` | zset | `<key>:<user>` of every 202 -> replay deadline (sold-out memo) |
| `fg:{S}:changes` | stream | operator audit log of the SKU's configuration (~ last 1000) |
| `fg:{S}:prequeue` | set | order ids pre-queued for the fair start (frozen once drawing) |
| `fg:{S}:waiting` | hash | user_id -> units pre-queued and not yet drawn |
| `fg:{S}:draw` | list | the drawn order ids in rank order (appended batch by batch) |
| `fg:{S}:transfers` | hash | stock moving out of this bucket: transfer id -> units, to, at |
| `fg:{S}:received` | zset | transfer ids this bucket received -> when (a week) |
| `fg:{mode}` | hash | mode, changed_at: the intake mode shared by every gateway |
| `fg:{mode}:relay-lag` | hash | relay group -> its lag figures (JSON), by its relays each second |
| `fg:{mode}:history` | list | the latest mode changes (who, from where), newest first (JSON) |
| `fg:{rules}` | hash | version, rules (JSON): the runtime rules shared by every gateway |
| `fg:{rules}:history` | list | the latest rule changes (who, from where, before, after), JSON |
| `fg:{u:<user>}:ik:<key>` | string | sku_id the key was first used for (24 h), standalone |
| `fg:{p:<payment_id>}` | string | order_id the payment confirmed, across SKUs, standalone |
"""

from __future__ import annotations

import base64
import functools
import os
import re
import zlib
from collections.abc import Iterator

from redis.crc import key_slot

from gateway.transport.cluster import SLOTS

PREFIX = "fg"
FINALIZER_GROUP = "finalizers"  # the consumer group every finalizer joins on every SKU stream
SKU_REGISTRY = f"{PREFIX}:skus"
DRAW_REGISTRY = f"{PREFIX}:draws"  # SKUs whose draw may not be done: finalizers watch these
MODE = f"{PREFIX}:{{mode}}"
RELAY_LAG = f"{MODE}:relay-lag"  # in the mode's slot: the ops reads' first round trip reads both
MODE_HISTORY = f"{MODE}:history"
RULES = f"{PREFIX}:{{rules}}"
RULES_HISTORY = f"{RULES}:history"
# Pub/sub channel of gateway notices: "mode" (re-read the mode), "rules" (re-read the runtime
# rules), "stock:<sku_id>" (stock came
# back: forget that the SKU was sold out). Channels are not keys: any node relays them.
NOTICES = f"{PREFIX}:notices"
STOCK_NOTICE = b"stock:"
DEFAULT_OPERATOR = "operator"  # who made a change, recorded when no name was given


def stock_notice(sku_id: str) -> str:
    """The notice that a SKU may have stock again (sold-out memos forget it)."""
    return STOCK_NOTICE.decode() + sku_id


ORDER_ID_PATTERN = r"^[a-z2-7]{26}\.[A-Za-z0-9_.:\-]{1,64}(?:~[0-9]{1,2}~[0-9]{1,6})?\Z"
_ORDER_ID = re.compile(ORDER_ID_PATTERN)
BUCKET_SEP = "~"


def bucket_tags(sku_id: str, count: int) -> list[str]:
    """The tags of a SKU's `count` stock buckets: bucket 0 is the SKU itself; bucket b lands
    in the b-th of `count` equal ranges of the slot space, counted from bucket 0's slot."""
    tags = [sku_id]
    base = key_slot(sku_id.encode())
    width = SLOTS // count
    for b in range(1, count):
        low = (base + b * width) % SLOTS
        n = 0
        while True:
            tag = f"{sku_id}{BUCKET_SEP}{b}{BUCKET_SEP}{n}"
            if (key_slot(tag.encode()) - low) % SLOTS < width:
                break
            n += 1
        tags.append(tag)
    return tags


def bucket_of(user_id: str, count: int) -> int:
    """A shopper's bucket: always the same one, so the per-user limit is counted in one slot."""
    return zlib.crc32(user_id.encode()) % count if count > 1 else 0


def _random_parts(batch: int = 256) -> Iterator[str]:
    """26 base32 characters (130 bits from os.urandom) each, encoded a batch at a time: one
    b32encode of 256 ids costs what a few single ones did."""
    while True:
        text = base64.b32encode(os.urandom(20 * batch)).decode("ascii").lower()
        for i in range(0, 32 * batch, 32):
            yield text[i : i + 26]


_random_part = _random_parts().__next__


def _after_fork() -> None:
    """A forked child must not hand out the ids left in its parent's batch."""
    global _random_part
    _random_part = _random_parts().__next__


os.register_at_fork(after_in_child=_after_fork)


def new_order_id(tag: str) -> str:
    """An unguessable order id (128+ random bits) that names its SKU bucket's tag, so the
    record is findable from the id alone and lives in that slot: `<26 base32 chars>.<tag>`."""
    return f"{_random_part()}.{tag}"


def split_order_id(order_id: str) -> tuple[str, str] | None:
    """(random part, bucket tag) of a well-formed order id, else None."""
    if not _ORDER_ID.match(order_id):
        return None
    rand, _, sku_id = order_id.partition(".")
    return rand, sku_id


class SkuKeys:
    """The keys of one SKU (or one of its stock buckets), all under the hash tag `{tag}`."""

    __slots__ = (
        "accepted",
        "bucket_tag",
        "changes",
        "dead",
        "events",
        "holds",
        "orders_prefix",
        "prequeue",
        "sku",
        "sku_id",
        "stream",
        "tag",
        "users",
        "waiting",
    )

    def __init__(self, tag: str) -> None:
        self.bucket_tag = tag
        self.sku_id = tag.partition(BUCKET_SEP)[0]
        self.tag = f"{PREFIX}:{{{tag}}}"
        self.sku = f"{self.tag}:sku"
        self.users = f"{self.tag}:users"
        self.holds = f"{self.tag}:holds"
        self.stream = f"{self.tag}:stream"
        self.accepted = f"{self.tag}:accepted"
        self.events = f"{self.tag}:events"
        self.dead = f"{self.tag}:dead"
        self.changes = f"{self.tag}:changes"
        self.orders_prefix = f"{self.tag}:o:"
        self.prequeue = f"{self.tag}:prequeue"
        self.waiting = f"{self.tag}:waiting"

    @property
    def transfers(self) -> str:
        return f"{self.tag}:transfers"

    @property
    def received(self) -> str:
        return f"{self.tag}:received"

    @property
    def draw(self) -> str:
        return f"{self.tag}:draw"

    @property
    def relay_dead(self) -> str:
        return f"{self.tag}:relay-dead"

    def order(self, order_id: str) -> str:
        return f"{self.tag}:o:{order_id.partition('.')[0]}"

    def payment(self, payment_id: str) -> str:
        return f"{self.tag}:pay:{payment_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        return f"{self.tag}:idem:{user_id}:{key}"


@functools.lru_cache(maxsize=4096)
def sku_keys(tag: str) -> SkuKeys:
    """`SkuKeys(tag)`, kept for the tags in use: the order path builds no key strings it
    built before (eleven per SKU). Bounded: a flood of unknown SKU ids only cycles it."""
    return SkuKeys(tag)


def order_key(order_id: str) -> str | None:
    """The record key of an order id, or None when the id is malformed."""
    parts = split_order_id(order_id)
    if parts is None:
        return None
    return f"{PREFIX}:{{{parts[1]}}}:o:{parts[0]}"


def key_guard(user_id: str, key: str) -> str:
    """Which SKU a user's idempotency key was first used for (outside cluster mode)."""
    return f"{PREFIX}:{{u:{user_id}}}:ik:{key}"


def payment_guard(payment_id: str) -> str:
    """Which order a payment_id confirmed, across SKUs (outside cluster mode)."""
    return f"{PREFIX}:{{p:{payment_id}}}"
