"""Order ids: unguessable, well-formed, never repeated, not even across a fork. Key names:
no two things ever share one, whatever the ids, and each hashes by its owner."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from gateway.store import keys
from gateway.store.keys import new_order_id, split_order_id


def test_order_ids_are_well_formed_and_distinct() -> None:
    ids = [new_order_id("sku-1") for _ in range(3000)]  # several batches
    assert len(set(ids)) == len(ids)
    for order_id in ids:
        parts = split_order_id(order_id)
        assert parts is not None and parts[1] == "sku-1" and len(parts[0]) == 26


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    new_order_id("s")  # the parent has a batch in hand
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write_end, " ".join(new_order_id("s") for _ in range(10)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        child = set(f.read().split())
    parent = {new_order_id("s") for _ in range(10)}
    assert len(child) == 10 and not child & parent


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first `{` and the next `}`."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


_ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
# ids that look like other key parts: other keys' prefixes, separators, hash-tag prefixes
_tricky = st.sampled_from(["u:a", "p:x", "ik", "o", "idem", "pay", "sku", "a:ik", "mode", ":", "."])


@settings(max_examples=300)
@given(
    skus=st.lists(_ids | _tricky, min_size=1, max_size=4, unique=True),
    users=st.lists(_ids | _tricky, min_size=1, max_size=4, unique=True),
    payments=st.lists(_ids | _tricky, min_size=1, max_size=3, unique=True),
    uuids=st.lists(st.uuids().map(str), min_size=1, max_size=2, unique=True),
)
def test_no_two_things_share_a_key_and_each_key_is_in_its_slot(
    skus: list[str], users: list[str], payments: list[str], uuids: list[str]
) -> None:
    """IDs chosen to look like other keys' parts never make two different things share a
    key, and every key hashes by its owner: the SKU, the user, the payment or the mode."""
    owner: dict[str, tuple[object, ...]] = {}

    def add(key: str, what: tuple[object, ...], tag: str) -> None:
        assert owner.setdefault(key, what) == what, (key, owner[key], what)
        assert hash_tag(key) == tag, key

    for name in ("MODE", "MODE_HISTORY"):
        add(getattr(keys, name), (name,), "mode")
    for sku in skus:
        sk = keys.SkuKeys(sku)
        for part in ("sku", "users", "holds", "stream", "accepted", "events", "dead", "changes"):
            add(getattr(sk, part), (sku, part), sku)
        order_id = keys.new_order_id(sku)
        add(sk.order(order_id), (sku, "order", order_id), sku)
        assert keys.order_key(order_id) == sk.order(order_id)
        for pay in payments:
            add(sk.payment(pay), (sku, "payment", pay), sku)
        for user in users:
            for key in uuids:
                add(sk.idempotency(user, key), (sku, "idem", user, key), sku)
    for user in users:
        for key in uuids:
            add(keys.key_guard(user, key), ("guard", user, key), f"u:{user}")
    for pay in payments:
        add(keys.payment_guard(pay), ("payment guard", pay), f"p:{pay}")
