"""msgspec schemas for every body the gateway reads or writes; one Encoder/Decoder per type.

They are also the source of the OpenAPI document (`web/openapi.py`): a field changed here is
changed there."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

# \Z, not $: `$` also matches before a trailing newline, which would pass "id\n".
ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,64}\Z"
MAX_BUCKETS = 64  # stock buckets of one SKU, at most


# The intake mode, shared by every worker and instance (`intake/mode.py`). No docstring: it
# would become the schema's description in the OpenAPI document.
class Mode(enum.StrEnum):
    NORMAL = "NORMAL"
    QUEUE_ONLY = "QUEUE_ONLY"


Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=ID_PATTERN)]
EpochSeconds = Annotated[int, Meta(ge=0, le=253_402_300_799)]
MAX_PREQUEUE_S = 7 * 86_400  # the longest pre-queue window before a fair start, in seconds

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
IdempotencyKey = Annotated[str, Meta(pattern=UUID_PATTERN)]
_UUID = re.compile(UUID_PATTERN)


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
    # hot-SKU stock buckets on different slots (docs/cluster/buckets.md); fixed at creation
    buckets: Annotated[int, Meta(ge=1, le=MAX_BUCKETS)] = 1
    # fair start (docs/api/fair-start.md): orders in [starts_at - prequeue_s, starts_at) are
    # pre-queued and decided by a draw at starts_at; 0: off
    prequeue_s: Annotated[int, Meta(ge=0, le=MAX_PREQUEUE_S)] = 0


Position = Annotated[
    int,
    Meta(
        ge=1,
        description="QUEUED: the unprocessed orders of the SKU bucket's queue ahead of this "
        "one, itself included (1 = next); never increases; null while the order is pre-queued "
        "for its SKU's fair-start draw",
    ),
]


class OrderAccepted(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The `202` of an order (built by `create_order.lua`; described here for the document)."""

    order_id: str
    status: Annotated[str, Meta(extra_json_schema={"enum": ["HELD", "QUEUED"]})]
    sku_id: str
    quantity: int
    hold_expires_at: int | None = None  # epoch ms; absent when QUEUED
    position: Position | None = None  # QUEUED only; null when pre-queued
    # pre-queued for a fair start: `"position": null` and the sale's start (epoch s)
    opens_at: int | None = None


class PaymentAccepted(Struct, frozen=True, kw_only=True):
    order_id: str
    payment_id: str
    accepted: bool


DrawProgress = Annotated[str, Meta(extra_json_schema={"enum": ["pending", "drawing", "done"]})]


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
    buckets: int = 1  # stock buckets (shown when more than one)
    bucket_tags: list[str] | None = None  # their keys' hash tags (a bucketed SKU)
    in_transit: int = 0  # units moving between buckets, counted in available (shown when any)
    prequeue_s: int = 0  # the fair start's pre-queue window (shown when set)
    draw_commitment: str | None = None  # sha256 of the draw's seed, hex (a fair start's SKU)
    draw: DrawProgress | None = None  # the draw's progress (a fair start's SKU)


class SkuSettings(Struct, frozen=True, kw_only=True):
    """A SKU's configuration as an operator sets it (one side of a change)."""

    promotion_id: str
    stock: int
    per_user_limit: int
    starts_at: int | None
    ends_at: int | None
    prequeue_s: int = 0


class SkuChange(Struct, frozen=True, kw_only=True):
    """One entry of a SKU's change log (`fg:{S}:changes`)."""

    id: str  # the stream entry id
    at: int  # epoch ms, server clock
    by: str  # X-Operator (self-declared)
    client: str | None  # the peer's address; None: unknown
    action: Annotated[str, Meta(extra_json_schema={"enum": ["created", "updated"]})]
    before: SkuSettings | None  # None for "created"
    after: SkuSettings


class SkuChanges(Struct, frozen=True, kw_only=True):
    sku_id: str
    changes: list[SkuChange]


class DrawView(Struct, frozen=True, kw_only=True):
    """A fair start's draw, once done: the seed revealed, its commitment, the pre-queued
    orders in rank order (ascending HMAC-SHA256(key=seed, msg=order_id), hex)."""

    sku_id: str
    seed: str  # 32 bytes, hex
    commitment: str  # sha256(seed bytes), hex: the SKU view's `draw_commitment`
    orders: list[str]  # order ids, rank 1 first


class ConsoleSku(Struct, frozen=True, kw_only=True, omit_defaults=True):
    sku_id: str
    stock: int
    available: int
    held: int
    sold: int
    holds: int  # active holds
    backlog: int  # orders no finalizer has decided yet
    pending: int  # stream entries delivered to a finalizer, not yet acknowledged
    dead: int  # dead letters
    draw: DrawProgress | None = None  # a fair start's draw (absent: the SKU has none)
    prequeued: int | None = None  # orders in the draw's pre-queue (with a draw)
    drawn: int | None = None  # pre-queued orders the draw decided so far (with a draw)


class ConsoleWorker(Struct, frozen=True, kw_only=True):
    """One live worker process of the instance that answered."""

    pid: int
    breaker: str  # closed | open | half_open
    mode: str | None  # the mode this worker applies (None: not known yet)


class ConsoleLatency(Struct, frozen=True, kw_only=True):
    """The order endpoint's latency histogram since the instance started, every worker summed:
    `counts[i]` answers took at most `le_ms[i]` milliseconds (cumulative); the last count,
    one more than the bounds, is every answer. Two readings give the quantiles between them."""

    le_ms: list[float]
    counts: list[int]
    sum_s: float


class ConsoleRelay(Struct, frozen=True, kw_only=True):
    group: str  # the relay target's consumer group
    target: str  # webhook | rabbitmq
    lag: int  # events the target has not confirmed yet
    oldest_unconfirmed_s: float  # age of the oldest of them (0: none)


class ConsoleView(Struct, frozen=True, kw_only=True):
    """What the ops console shows: the shared mode and its recent switches, every SKU's
    figures from Redis, each relay target's lag (as its relays last wrote it), and what the
    workers of the answering instance counted.
    `entries_in` counts every entry ever added to the SKUs' streams (orders and payments, all
    instances): its rate is intake per second. `answers` counts the order endpoint's answers
    by code (`created`, `replayed`, or the error code) since the instance started."""

    mode: str
    changed_at: int | None
    history: msgspec.Raw  # [ModeSwitch, ...] newest first
    breaker: str  # closed | open | half_open, the answering worker's
    entries_in: int
    skus: list[ConsoleSku]
    answers: dict[str, int]
    latency: ConsoleLatency
    workers: list[ConsoleWorker]  # by pid
    relays: list[ConsoleRelay]


ORDER_STATUSES = ("QUEUED", "HELD", "CONFIRMED", "EXPIRED", "REJECTED", "PAID_AFTER_EXPIRY")
OrderStatus = Annotated[str, Meta(extra_json_schema={"enum": list(ORDER_STATUSES)})]


class OrderTransition(Struct, frozen=True, kw_only=True):
    """One entry of an order's `history` (kept as JSON in Redis, sent as is)."""

    from_: OrderStatus | None = msgspec.field(name="from")  # None: the creation entry
    to: OrderStatus
    at: int  # epoch ms


class QueueView(Struct, frozen=True, kw_only=True):
    """Where a QUEUED order stands (docs/api/shoppers.md). A pre-queued order has no place
    before its SKU's fair-start draw (docs/api/fair-start.md): position and ETA null, and
    `poll_after_s` runs to the sale's start."""

    position: Position | None
    eta_s: Annotated[
        float | None,
        Meta(
            description="seconds until the order is decided at the queue's measured drain "
            "rate; null while the rate is unknown or the order is pre-queued"
        ),
    ]
    poll_after_s: Annotated[
        int,
        Meta(
            ge=1,
            le=30,
            description="whole seconds to wait before asking again (also `Retry-After`)",
        ),
    ]


class OrderView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    order_id: str
    status: OrderStatus
    user_id: str
    sku_id: str
    quantity: int
    promotion_id: str
    created_at: int
    history: msgspec.Raw  # [OrderTransition, ...] oldest first
    hold_expires_at: int | None = None
    opens_at: int | None = None  # pre-queued for a fair start: the sale's start (epoch s)
    queue: QueueView | None = None  # QUEUED orders only


class Health(Struct, frozen=True, kw_only=True):
    status: Annotated[str, Meta(extra_json_schema={"enum": ["ok"]})]


class Readiness(Struct, frozen=True, kw_only=True):
    status: Annotated[str, Meta(extra_json_schema={"enum": ["ready"]})]
    mode: Mode
    pid: int


class ErrorBody(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Every non-2xx answer (`app.error_response`); more fields may come (the contract)."""

    error: str  # a stable code (`errors.py`)
    message: str  # for people; the shopper's busy message on overload answers
    available: int | None = None  # sold_out: units still available
    backlog: int | None = None  # queue_full: unprocessed orders in the SKU's stream
    committed: int | None = None  # stock_below_committed: units held plus sold
    reason: str | None = None  # sale_not_active: not_started | ended; unavailable (readyz)
    draw: str | None = None  # draw_pending: pending | drawing


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
    if _UUID.match(value) is None:  # IdempotencyKey's pattern (msgspec.convert: 3x the time)
        raise msgspec.ValidationError("X-Idempotency-Key must be a UUID")
    return value.lower()
