"""An events-stream entry as the relay delivers it: the contract's body and id."""

from __future__ import annotations

import msgspec
import pytest

from gateway.workers.relay.events import event_id, from_entry

ENTRY = {
    b"event": b"CONFIRMED",
    b"order_id": b"abc.sku-42",
    b"status": b"CONFIRMED",
    b"user_id": b"u1",
    b"sku_id": b"sku-42",
    b"quantity": b"2",
    b"promotion_id": b"p1",
    b"created_at": b"1795597379329",
    b"at": b"1795597380000",
    b"history": b'[{"from":null,"to":"HELD","at":1},{"from":"HELD","to":"CONFIRMED","at":2}]',
    b"payment_id": b"pay-1",
}


def test_the_body_keeps_every_field_with_numbers_and_history_typed() -> None:
    event = from_entry("sku-42", 0, b"1795597380000-0", ENTRY)
    assert event.id == "sku-42/0/1795597380000-0"
    assert event.type == "CONFIRMED"
    body = msgspec.json.decode(event.body)
    assert body == {
        "event": "CONFIRMED",
        "order_id": "abc.sku-42",
        "status": "CONFIRMED",
        "user_id": "u1",
        "sku_id": "sku-42",
        "quantity": 2,
        "promotion_id": "p1",
        "created_at": 1795597379329,
        "at": 1795597380000,
        "history": [
            {"from": None, "to": "HELD", "at": 1},
            {"from": "HELD", "to": "CONFIRMED", "at": 2},
        ],
        "payment_id": "pay-1",
    }


def test_ids_are_unique_across_skus_and_buckets() -> None:
    ids = {event_id(sku, bucket, "1-0") for sku in ("a", "b") for bucket in (0, 1)}
    assert len(ids) == 4


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in ENTRY.items() if k != b"event"},
        {**ENTRY, b"history": b"not json"},
        {**ENTRY, b"quantity": b"two"},
    ],
)
def test_an_entry_that_is_not_an_event_is_refused(broken: dict[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        from_entry("sku-42", 0, b"1-0", broken)
