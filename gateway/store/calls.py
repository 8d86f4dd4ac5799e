"""One builder per Lua script: named fields in, the script's KEYS and ARGV lists out.

Each function is named after its script. Its first parameters say which keys it touches;
the rest, keyword-only except create_order's, are the script's ARGV, named and ordered as the
header of lua/<script>.lua declares them. Nothing else in Python knows a KEYS or ARGV position
(tests/test_script_contracts.py holds the builders to the headers). The builders are plain
functions returning the two lists: the order path's builder allocates nothing more than the
lists it sends. What the scripts answer is typed in `outcomes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from gateway.store import keys
from gateway.store.keys import SkuKeys
from gateway.transport.scripts import Arg

Call = tuple[list[str], list[Arg]]


def _opt(value: int | None) -> Arg:
    """An optional number on the wire: "" for none."""
    return "" if value is None else value


def create_order(
    sku: SkuKeys,
    idempotency_key: str,
    guarded: bool,
    order_id: str,
    user_id: str,
    sku_id: str,
    quantity: int,
    promotion_id: str,
    fingerprint: str,
    hold_ttl_ms: int,
    idempotency_ttl_ms: int,
    now_ms: int | None,
    mode: Literal["hold", "queue"],
    queue_max: int,
    accepted_member: str,
    claim_token: str,
    replay_only: bool,
    buckets: int,
    durable: bool,
) -> Call:
    """One order on `sku` (the shopper's bucket); `guarded`: with the cross-SKU key guard
    (one server; cluster mode claims the key with claim_key instead).

    The order path calls this positionally: on CPython 3.11, 16 keyword arguments cost more
    than the rest of the builder (about 0.6 us a call, measured); elsewhere call by name."""
    ks = [
        sku.sku,
        sku.users,
        sku.holds,
        sku.stream,
        sku.order(order_id),
        sku.idempotency(user_id, idempotency_key),
        sku.accepted,
        sku.prequeue,
        sku.waiting,
    ]
    if guarded:
        ks.append(keys.key_guard(user_id, idempotency_key))
    return ks, [
        order_id,
        user_id,
        sku_id,
        quantity,
        promotion_id,
        fingerprint,
        hold_ttl_ms,
        idempotency_ttl_ms,
        "" if now_ms is None else now_ms,
        mode,
        queue_max,
        accepted_member,
        claim_token,
        "1" if replay_only else "",
        buckets,
        "1" if durable else "",
    ]


def claim_key(
    guard: str, *, token: str, fingerprint: str, stale_ms: int, ttl_ms: int, now_ms: int | None
) -> Call:
    """Claim (user, key) in the user's slot; `guard` is `keys.key_guard(user, key)`."""
    return [guard], [token, fingerprint, stale_ms, ttl_ms, _opt(now_ms)]


def settle_key(
    guard: str,
    *,
    token: str,
    outcome: Literal["done", "release"],
    fingerprint: str,
    ttl_ms: int,
) -> Call:
    return [guard], [token, outcome, fingerprint, ttl_ms]


def fence_key(record: str, *, token: str, ttl_ms: int, tokens_kept: int) -> Call:
    """`record` is the SKU's idempotency record of (user, key) (`SkuKeys.idempotency`)."""
    return [record], [token, ttl_ms, tokens_kept]


def claim_guard(guard: str, *, value: str) -> Call:
    return [guard], [value]


def release_guard(guard: str, *, value: str) -> Call:
    return [guard], [value]


def confirm_payment(
    sku: SkuKeys,
    guard: str | None,
    *,
    payment_id: str,
    order_id: str,
    now_ms: int | None,
    durable: bool,
) -> Call:
    """`guard`: the payment_id's guard across SKUs (one server), None in cluster mode."""
    ks = [sku.payment(payment_id), sku.order(order_id), sku.holds, sku.stream]
    if guard is not None:
        ks.append(guard)
    return ks, [payment_id, order_id, _opt(now_ms), "1" if durable else ""]


def configure_sku(
    sku: SkuKeys,
    *,
    promotion_id: str,
    stock: int,
    per_user_limit: int,
    starts_at: int | None,
    ends_at: int | None,
    by: str,
    client: str,
    changes_kept: int,
    stock_mode: Literal["set", "init", "total"],
    buckets: int | None,
    total_stock: int | None,
    log_change: bool,
    prequeue_s: int,
    draw_seed: str,
    draw_commitment: str,
) -> Call:
    """`buckets` None: any bucket count; `total_stock` None: not a bucketed SKU's bucket 0;
    `draw_seed` "": no new draw (prequeue_s 0, or a bucket other than 0)."""
    return [sku.sku, sku.changes], [
        promotion_id,
        stock,
        per_user_limit,
        _opt(starts_at),
        _opt(ends_at),
        by,
        client,
        changes_kept,
        stock_mode,
        _opt(buckets),
        _opt(total_stock),
        "1" if log_change else "0",
        prequeue_s,
        draw_seed,
        draw_commitment,
    ]


def draw_open(sku: SkuKeys, *, now_ms: int | None) -> Call:
    return [sku.sku, sku.prequeue], [_opt(now_ms)]


def draw_decide(
    sku: SkuKeys,
    *,
    cursor: int,
    hold_ttl_ms: int,
    now_ms: int | None,
    orders_prefix: str,
    order_ids: Sequence[str],
) -> Call:
    """One batch of the draw of `sku`, `order_ids` in rank order from rank `cursor` + 1."""
    return [sku.sku, sku.users, sku.holds, sku.events, sku.waiting, sku.draw], [
        cursor,
        hold_ttl_ms,
        _opt(now_ms),
        orders_prefix,
        *order_ids,
    ]


def audit_sku(sku: SkuKeys, *, orders_prefix: str) -> Call:
    return [sku.sku, sku.users, sku.holds], [orders_prefix]


def take_stock(
    bucket: SkuKeys, *, transfer_id: str, units: int, to_tag: str, now_ms: int | None
) -> Call:
    return [bucket.sku, bucket.transfers], [transfer_id, units, to_tag, _opt(now_ms)]


def give_stock(
    bucket: SkuKeys, *, transfer_id: str, units: int, now_ms: int | None, received_kept_ms: int
) -> Call:
    return [bucket.sku, bucket.received], [transfer_id, units, _opt(now_ms), received_kept_ms]


def finalize(
    sku: SkuKeys,
    stream: str,
    *,
    group: str,
    entry_id: bytes | str,
    event: Literal["created", "paid"],
    order_id: str,
    payment_id: str,
    hold_ttl_ms: int,
    now_ms: int | None,
) -> Call:
    """One entry of `stream` (the order stream of `sku`); a "paid" one with its payment."""
    ks = [sku.sku, sku.users, sku.holds, stream, sku.order(order_id), sku.events]
    if event == "paid":
        ks.append(sku.payment(payment_id))
    return ks, [group, entry_id, event, order_id, payment_id, hold_ttl_ms, _opt(now_ms)]


def read_order(order: str, sku: SkuKeys) -> Call:
    """`order` is the record key (`keys.order_key`); `sku` its bucket's keys."""
    return [order, sku.sku], []


def dead_letter(
    sku: SkuKeys,
    stream: str,
    order_id: str | None,
    *,
    group: str,
    entry_id: bytes | str,
    reason: str,
    fields: Sequence[Arg],
) -> Call:
    """One entry of `stream`; `order_id`: the order of a "created" entry (None: none or
    malformed); `fields`: the entry's fields and values, in pairs."""
    ks = [stream, sku.dead, sku.sku]
    if order_id is not None:
        ks.append(sku.order(order_id))
    return ks, [group, entry_id, reason, *fields]


def replay_dead(sku: SkuKeys, *, dead_id: bytes | str) -> Call:
    """One dead letter of `sku` back onto its order stream."""
    return [sku.dead, sku.stream], [dead_id]


def relay_read(events: str, *, group: str, consumer: str, count: int, min_idle_ms: int) -> Call:
    """`events`: one SKU bucket's events stream (`SkuKeys.events`)."""
    return [events], [group, consumer, count, min_idle_ms]


def relay_dead(
    sku: SkuKeys,
    *,
    group: str,
    entry_id: bytes | str,
    event_id: str,
    reason: str,
    fields: Sequence[Arg],
) -> Call:
    """One entry of the events stream of `sku` (a SKU bucket); `fields`: the entry's fields
    and values, in pairs."""
    return [sku.events, sku.relay_dead], [group, entry_id, event_id, reason, *fields]


def sku_figures(sku: SkuKeys, *, group: str, streams: Literal[0, 1, 2]) -> Call:
    keys_ = [sku.sku, sku.stream, sku.events, sku.dead, sku.holds, sku.prequeue]
    return keys_, [group, streams]


def sku_figures_of(skus: Sequence[SkuKeys], *, group: str, streams: Literal[0, 1, 2]) -> Call:
    """sku_figures.lua over several SKUs at once (one server: their keys need not share a
    slot): each SKU's six keys in turn, one reply list per SKU in the same order."""
    keys_ = [k for sku in skus for k in sku_figures(sku, group=group, streams=streams)[0]]
    return keys_, [group, streams]


def sweep(sku: SkuKeys, *, now_ms: int | None, batch: int, orders_prefix: str, skip: int) -> Call:
    return [sku.sku, sku.users, sku.holds, sku.events], [
        _opt(now_ms),
        batch,
        orders_prefix,
        skip,
    ]


def switch_mode(*, mode: str, channel: str, history_kept: int, by: str, client: str) -> Call:
    return [keys.MODE, keys.MODE_HISTORY], [mode, channel, history_kept, by, client]


def set_rules(
    *, expected_version: int, rules: bytes, channel: str, history_kept: int, by: str, client: str
) -> Call:
    return [keys.RULES, keys.RULES_HISTORY], [
        expected_version,
        rules,
        channel,
        history_kept,
        by,
        client,
    ]
