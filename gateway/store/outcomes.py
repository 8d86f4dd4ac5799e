"""What the Lua scripts answer, typed: one IntEnum per script that answers a code, one small
NamedTuple per script that answers figures (field names as in the script's `Returns` line);
and the order-state contract the audit checks every order's history against.

tests/test_script_contracts.py holds these to the headers of lua/*.lua.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import msgspec

from gateway.transport.replies import text


class CreateResult(IntEnum):
    """create_order.lua."""

    CREATED = 1
    REPLAYED = 2
    UNKNOWN_SKU = -1
    NOT_ACTIVE = -2
    SOLD_OUT = -3
    LIMIT_EXCEEDED = -4
    KEY_REUSED = -5
    QUEUE_FULL = -6
    CLAIM_LOST = -7  # cluster mode: this request's claim was recovered as abandoned
    IN_USE = -8  # cluster mode: another request with this key is in progress
    LAYOUT = -9  # the SKU has another number of stock buckets than the request assumed


class Claim(IntEnum):
    """claim_key.lua (cluster mode's phase one)."""

    CLAIMED = 1
    DONE_SAME = 2
    PENDING_SAME = 3
    STALE = 4
    KEY_REUSED = -5
    IN_USE = -8


class Settled(IntEnum):
    """settle_key.lua."""

    SETTLED = 1
    NOT_MINE = 0  # the claim was not this token's


class Fenced(IntEnum):
    """fence_key.lua."""

    ORDER_EXISTS = 1
    FENCED = 0


class Released(IntEnum):
    """release_guard.lua."""

    RELEASED = 1
    KEPT = 0


class PaymentResult(IntEnum):
    """confirm_payment.lua."""

    ACCEPTED = 1
    REPLAYED = 2
    UNKNOWN_ORDER = -1
    PAYMENT_REUSED = -2


class ConfigureResult(IntEnum):
    """configure_sku.lua."""

    CREATED = 1
    UPDATED = 2
    STOCK_BELOW_COMMITTED = -1
    BUCKETS_FIXED = -2  # the bucket count of an existing SKU cannot change


class FinalizeResult(IntEnum):
    """finalize.lua."""

    APPLIED = 1
    DUPLICATE = 0  # the effect was already stored
    UNKNOWN_ORDER = -1
    WAITING = 2  # the SKU's fair-start draw is not done: left pending, nothing written


class DeadLettered(IntEnum):
    """dead_letter.lua."""

    DEAD_LETTERED = 1


class Replayed(IntEnum):
    """replay_dead.lua."""

    REPLAYED = 1
    NOT_FOUND = -1


class ReplayReply(NamedTuple):
    """replay_dead.lua: the code and the entry's new id on the order stream ("" if none)."""

    code: Replayed
    entry_id: str

    @classmethod
    def of(cls, raw: Sequence[Any]) -> ReplayReply:
        code, entry_id = raw
        return cls(Replayed(code), entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


class RelayRead(IntEnum):
    """relay_read.lua."""

    READ = 1
    BUSY = 0  # another relay holds entries of the stream


class RelayDead(IntEnum):
    """relay_dead.lua."""

    DEAD_LETTERED = 1
    NOT_PENDING = 0  # already confirmed or dead-lettered by another relay


class Given(IntEnum):
    """give_stock.lua."""

    GIVEN = 1
    ALREADY_GIVEN = 0


class ClaimReply(NamedTuple):
    """claim_key.lua: token and fingerprint are those of a STALE claim ("" otherwise)."""

    code: Claim
    token: str
    fingerprint: str

    @classmethod
    def of(cls, raw: Sequence[Any]) -> ClaimReply:
        return cls(Claim(raw[0]), text(raw[1]), text(raw[2]))


class Finalized(NamedTuple):
    """finalize.lua: the status after the entry ("" for an unknown order); for a QUEUED order
    the entry decided, how long it was queued and the ETA it was told (ms; None: none)."""

    code: FinalizeResult
    status: str
    waited_ms: int | None = None
    eta_ms: int | None = None

    @classmethod
    def of(cls, raw: Sequence[Any]) -> Finalized:
        return cls(FinalizeResult(raw[0]), text(raw[1]), _ms(raw, 2), _ms(raw, 3))


def _ms(raw: Sequence[Any], i: int) -> int | None:
    """The optional integer at `raw[i]` ("" or missing: None)."""
    value = raw[i] if len(raw) > i else None
    return int(value) if value else None


class OrderRead(NamedTuple):
    """read_order.lua: the record's fields (empty: no such order) and, for a QUEUED order,
    its queue's figures (`store.queue.place` reads them)."""

    record: list[Any]
    queue: list[Any]

    @classmethod
    def of(cls, raw: Sequence[Any]) -> OrderRead:
        return cls(list(raw[0]), list(raw[1]))


class DrawState(IntEnum):
    """draw_open.lua."""

    DRAWING = 1
    DONE = 2
    NO_DRAW = -1  # the SKU has no fair start
    NOT_DUE = -2  # its sale has not started


class DrawOpened(NamedTuple):
    """draw_open.lua: where the draw stands, and its seed (hex) while it is open or done."""

    code: DrawState
    cursor: int
    total: int
    seed: str

    @classmethod
    def of(cls, raw: Sequence[Any]) -> DrawOpened:
        return cls(DrawState(raw[0]), int(raw[1]), int(raw[2]), text(raw[3]))


class DrawDecided(IntEnum):
    """draw_decide.lua."""

    DECIDED = 1
    STALE = 0  # another drawer moved the cursor: nothing written
    NOT_DRAWING = -1  # the draw is not open (or done): nothing written


class DrawBatch(NamedTuple):
    """draw_decide.lua: the outcome, the draw's cursor after it, and how many of the batch's
    orders this call decided HELD and REJECTED."""

    code: DrawDecided
    cursor: int
    held: int
    rejected: int

    @classmethod
    def of(cls, raw: Sequence[Any]) -> DrawBatch:
        return cls(DrawDecided(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]))


class AuditFigures(NamedTuple):
    """audit_sku.lua: one SKU's counters and holds (exists 0: not configured, all else 0)."""

    exists: int
    stock: int
    available: int
    held: int
    sold: int
    users_total: int
    holds_count: int
    holds_units: int
    holds_not_held: int
    earliest_deadline_ms: int  # 0: no hold with a deadline
    backlog: int

    @classmethod
    def of(cls, raw: Sequence[Any]) -> AuditFigures:
        return cls._make(int(x) for x in raw)


class Taken(NamedTuple):
    """take_stock.lua: units taken, transfers out of the bucket in flight, transfers the
    bucket ever received."""

    units: int
    in_flight: int
    received: int

    @classmethod
    def of(cls, raw: Sequence[Any]) -> Taken:
        return cls._make(int(x) for x in raw)


class SkuFigures(NamedTuple):
    """sku_figures.lua: one SKU's (or stock bucket's) figures, in `figures.SkuSample`'s order
    (its drain rate aside), then its bucket count, total stock and drain rate, then its draw."""

    stock: int
    available: int
    held: int
    sold: int
    holds: int
    backlog: int
    pending: int
    dead: int
    entries_in: int
    entries_out: int
    buckets: int
    total_stock: int
    drain_rate_milli: int  # orders decided per 1,000 s of busy time (finalize.lua's EWMA)
    draw_state: int  # the fair start's draw: 0 none, 1 pending, 2 drawing, 3 done
    prequeued: int  # orders in the draw's pre-queue (fixed once it opens)
    drawn: int  # orders the draw decided so far (its cursor)

    @classmethod
    def of(cls, raw: Sequence[int]) -> SkuFigures | None:
        """None for an empty reply (the SKU is not configured). The script answers integers:
        taken as they are (10,000 SKUs a pass)."""
        return cls._make(raw) if raw else None


class Swept(NamedTuple):
    """sweep.lua: orders expired, their units, due holds looked at, holds out of the index."""

    released: int
    units: int
    selected: int
    removed: int

    @classmethod
    def of(cls, raw: Sequence[Any]) -> Swept:
        return cls._make(int(x) for x in raw)


class ModeChange(NamedTuple):
    """switch_mode.lua: changed 1 | 0, the mode now, changed_at epoch ms ("" never)."""

    changed: int
    mode: str
    changed_at: str

    @classmethod
    def of(cls, raw: Sequence[Any]) -> ModeChange:
        return cls(int(raw[0]), text(raw[1]), text(raw[2]))


class RulesResult(IntEnum):
    STALE = 0  # the version moved (or, seeding, there were rules already): nothing set
    SET = 1


class RulesChange(NamedTuple):
    """set_rules.lua: SET or STALE, the version and rules JSON in force (-1 and b"": none)."""

    code: RulesResult
    version: int
    rules: bytes

    @classmethod
    def of(cls, raw: Sequence[Any]) -> RulesChange:
        return cls(RulesResult(int(raw[0])), int(raw[1]), bytes(raw[2]))


# The order-state contract's transitions; (None, X) is the creation entry.
TRANSITIONS = frozenset(
    {
        (None, "HELD"),
        (None, "QUEUED"),
        ("QUEUED", "HELD"),
        ("QUEUED", "REJECTED"),
        ("HELD", "CONFIRMED"),
        ("HELD", "EXPIRED"),
        ("HELD", "PAID_AFTER_EXPIRY"),
        ("EXPIRED", "PAID_AFTER_EXPIRY"),
    }
)


def history_problem(status: str, history: bytes, paid: bool) -> str | None:
    """What is wrong with one order's history (None: it follows the contract)."""
    try:
        steps = [(h["from"], h["to"]) for h in msgspec.json.decode(history)]
    except (msgspec.DecodeError, KeyError, TypeError):
        return "unreadable history"
    if not steps or steps[0][0] is not None:
        return "history does not start with the creation"
    for (_, prev_to), (frm, _) in zip(steps, steps[1:], strict=False):
        if frm != prev_to:
            return f"history jumps from {prev_to} to {frm}"
    bad = [step for step in steps if step not in TRANSITIONS]
    if bad:
        return f"transition {bad[0][0]} -> {bad[0][1]} is not allowed"
    if steps[-1][1] != status:
        return f"status {status} but history ends at {steps[-1][1]}"
    if status == "CONFIRMED" and not paid:
        return "CONFIRMED without a payment"
    return None
