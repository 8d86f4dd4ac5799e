"""msgspec schemas for every body the gateway reads or writes; one Encoder/Decoder per type."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from gateway.keys import ID_PATTERN

Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=ID_PATTERN)]
EpochSeconds = Annotated[int, Meta(ge=0, le=253_402_300_799)]

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
IdempotencyKey = Annotated[str, Meta(pattern=UUID_PATTERN)]


class OrderRequest(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    user_id: Id
    sku_id: Id
    quantity: Annotated[int, Meta(ge=1)]
    promotion_id: Id

    def fingerprint(self) -> str:
        """What makes two requests with one idempotency key "the same request"."""
        return f"{self.sku_id}|{self.quantity}|{self.promotion_id}"


class PaymentConfirmation(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    order_id: Annotated[str, Meta(min_length=1, max_length=100)]
    payment_id: Id


class SkuConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    promotion_id: Id
    stock: Annotated[int, Meta(ge=0, le=1_000_000_000)]
    per_user_limit: Annotated[int, Meta(ge=1, le=1_000_000_000)]
    starts_at: EpochSeconds | None = None
    ends_at: EpochSeconds | None = None


class SkuView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    sku_id: str
    promotion_id: str
    stock: int
    available: int
    held: int
    sold: int
    per_user_limit: int
    starts_at: int | None = None
    ends_at: int | None = None


class SkuSettings(Struct, frozen=True, kw_only=True):
    """A SKU's configuration as an operator sets it (one side of a change)."""

    promotion_id: str
    stock: int
    per_user_limit: int
    starts_at: int | None
    ends_at: int | None


class SkuChange(Struct, frozen=True, kw_only=True):
    """One entry of a SKU's change log (`fg:{S}:changes`)."""

    id: str  # the stream entry id
    at: int  # epoch ms, server clock
    by: str  # X-Operator (self-declared)
    client: str | None  # the peer's address; None: unknown
    action: str  # "created" | "updated"
    before: SkuSettings | None  # None for "created"
    after: SkuSettings


class SkuChanges(Struct, frozen=True, kw_only=True):
    sku_id: str
    changes: list[SkuChange]


class OrderView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    order_id: str
    status: str
    user_id: str
    sku_id: str
    quantity: int
    promotion_id: str
    created_at: int
    history: msgspec.Raw
    hold_expires_at: int | None = None


order_request_decoder = msgspec.json.Decoder(OrderRequest)
sku_config_decoder = msgspec.json.Decoder(SkuConfig)
payment_decoder = msgspec.json.Decoder(PaymentConfirmation)
encoder = msgspec.json.Encoder()


def parse_idempotency_key(raw: str | None) -> str:
    """The canonical (lower-case) UUID of an `Idempotency-Key` header value, bare or quoted.

    Raises msgspec.ValidationError when it is not a UUID.
    """
    if raw is None:
        raise msgspec.ValidationError("missing X-Idempotency-Key header")
    value = raw.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    try:
        key: str = msgspec.convert(value, IdempotencyKey)
    except msgspec.ValidationError:
        raise msgspec.ValidationError("X-Idempotency-Key must be a UUID") from None
    return key.lower()
