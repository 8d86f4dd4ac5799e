"""Order ids: unguessable, well-formed, never repeated, not even across a fork."""

from __future__ import annotations

import os

from gateway.keys import new_order_id, split_order_id


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
