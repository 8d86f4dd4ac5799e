"""Cluster mode's two-phase idempotency record (lua/claim_key.lua, settle_key.lua,
fence_key.lua), driven on one real server: the user's key and the SKU are in different slots
there too, so each phase and each crash between phases can be staged exactly."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from gateway.schemas import OrderRequest, SkuConfig
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.inventory import Inventory
from gateway.store.orders import accepted_member
from gateway.store.outcomes import Claim, ClaimReply, CreateResult, PaymentResult
from gateway.transport.scripts import ScriptRegistry
from tests.support.state import BOTH_BACKENDS

T0 = 1_800_000_000_000  # injected server time (ms) so staleness is exact
STALE_MS = 5000

pytestmark = BOTH_BACKENDS


async def two_phase(redis: Redis, settings: Settings) -> Inventory:
    inv = Inventory(
        redis, ScriptRegistry(), settings.replace(claim_stale_ms=STALE_MS), two_phase=True
    )
    for sku in ("a", "b"):
        await inv.configure_sku(sku, SkuConfig(promotion_id="p", stock=3, per_user_limit=5))
    return inv


def order(sku: str = "a", qty: int = 1, user: str = "u") -> OrderRequest:
    return OrderRequest(user_id=user, sku_id=sku, quantity=qty, promotion_id="p")


async def orders_made(redis: Redis) -> int:
    return sum([await redis.xlen(keys.SkuKeys(s).stream) for s in ("a", "b")])


async def test_accepted_key_replays_and_refuses_another_sku(
    redis: Redis, settings: Settings
) -> None:
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    created, body = await inv.create_order(order(), key, now_ms=T0)
    assert created is CreateResult.CREATED
    replay, again = await inv.create_order(order(), key, now_ms=T0 + 10)
    assert (replay, again) == (CreateResult.REPLAYED, body)
    assert (await inv.create_order(order("b"), key, now_ms=T0 + 20))[0] is CreateResult.KEY_REUSED
    assert (await inv.create_order(order(qty=2), key, now_ms=T0 + 30))[0] is CreateResult.KEY_REUSED
    claim = await redis.get(keys.key_guard("u", key))
    assert claim == b"D\na|1|p"  # settled: accepted, for the idempotency window
    assert 0 < await redis.pttl(keys.key_guard("u", key)) <= settings.idempotency_ttl_s * 1000
    assert await orders_made(redis) == 1


async def test_a_refusal_releases_the_claim(redis: Redis, settings: Settings) -> None:
    """A refused request leaves no trace: its claim is gone, and the key is free for
    another SKU."""
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    assert (await inv.create_order(order(qty=4), key, now_ms=T0))[0] is CreateResult.SOLD_OUT
    assert await redis.exists(keys.key_guard("u", key)) == 0
    assert (await inv.create_order(order("b"), key, now_ms=T0 + 1))[0] is CreateResult.CREATED


async def test_concurrent_taps_make_one_order(redis: Redis, settings: Settings) -> None:
    """Ten taps with one key at once: one order; each other tap replays it or is told the
    first is still in progress (409 idempotency_key_in_use), never a second order."""
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    results = await asyncio.gather(*(inv.create_order(order(), key) for _ in range(10)))
    codes = [r for r, _ in results]
    assert codes.count(CreateResult.CREATED) == 1
    assert set(codes) <= {CreateResult.CREATED, CreateResult.REPLAYED, CreateResult.IN_USE}
    bodies = {body for r, body in results if r is not CreateResult.IN_USE}
    assert len(bodies) == 1
    assert await orders_made(redis) == 1


async def test_concurrent_keys_across_skus_make_one_order(redis: Redis, settings: Settings) -> None:
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    results = await asyncio.gather(
        *(inv.create_order(order("a" if i % 2 else "b"), key) for i in range(20))
    )
    assert [r for r, _ in results].count(CreateResult.CREATED) == 1
    assert await orders_made(redis) == 1


async def phase_two(
    inv: Inventory, redis: Redis, key: str, token: str, now_ms: int
) -> CreateResult:
    """SKU a's script for user u's order with claim `token`, as a gateway sends it: a late
    delivery of an abandoned request, or one whose gateway dies before settling."""
    req = order()
    settings = inv.settings
    call = calls.create_order(
        keys.SkuKeys("a"),
        key,
        guarded=False,  # cluster mode: the key is claimed in the user's slot instead
        order_id=keys.new_order_id("a"),
        user_id=req.user_id,
        sku_id=req.sku_id,
        quantity=req.quantity,
        promotion_id=req.promotion_id,
        fingerprint=req.fingerprint(),
        hold_ttl_ms=settings.hold_ttl_s * 1000,
        idempotency_ttl_ms=settings.idempotency_ttl_s * 1000,
        now_ms=now_ms,
        mode="hold",
        queue_max=settings.queue_max,
        accepted_member=accepted_member(req.user_id, key),
        claim_token=token,
        replay_only=False,
        buckets=1,
        durable=inv.send.durable,
    )
    code, _ = await inv.scripts["create_order"](redis, *call)
    return CreateResult(code)


async def abandon(inv: Inventory, redis: Redis, key: str, *, created: bool) -> str:
    """A gateway that claimed (user, key) for SKU a and died: before its SKU script ran, or
    (created) after it and before settling. Returns the abandoned token."""
    token = "abandonedtoken0000000000ab"
    call = calls.claim_key(
        keys.key_guard("u", key),
        token=token,
        fingerprint=order().fingerprint(),
        stale_ms=STALE_MS,
        ttl_ms=86_400_000,
        now_ms=T0,
    )
    claimed = ClaimReply.of(await inv.scripts["claim_key"](redis, *call))
    assert claimed.code is Claim.CLAIMED
    if created:
        assert await phase_two(inv, redis, key, token, T0) is CreateResult.CREATED
    return token


async def test_an_abandoned_claim_is_in_use_until_stale_then_recovered(
    redis: Redis, settings: Settings
) -> None:
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    token = await abandon(inv, redis, key, created=False)
    # fresh: another body is told to retry; the same body may only replay (nothing yet)
    assert (await inv.create_order(order("b"), key, now_ms=T0 + 100))[0] is CreateResult.IN_USE
    assert (await inv.create_order(order(), key, now_ms=T0 + 100))[0] is CreateResult.IN_USE
    # stale: recovered (no order on a: the token is fenced), then this request decides
    result, _ = await inv.create_order(order("b"), key, now_ms=T0 + STALE_MS)
    assert result is CreateResult.CREATED
    # the abandoned request arriving late on SKU a can never make a second order
    late = await phase_two(inv, redis, key, token, T0 + STALE_MS + 1)
    assert late is CreateResult.CLAIM_LOST
    assert await orders_made(redis) == 1
    assert (await inv.create_order(order(), key, now_ms=T0 + STALE_MS + 2))[
        0
    ] is CreateResult.KEY_REUSED


async def test_a_claim_abandoned_after_its_order_is_recovered_as_accepted(
    redis: Redis, settings: Settings
) -> None:
    inv = await two_phase(redis, settings)
    key = str(uuid.uuid4())
    guard = keys.key_guard("u", key)
    await abandon(inv, redis, key, created=True)  # the gateway died before settling
    # the same request again within the stale window: the order answers (a replay)
    assert (await inv.create_order(order(), key, now_ms=T0 + 1))[0] is CreateResult.REPLAYED
    # another body once stale: recovery finds the order, so the key stays taken
    assert (await inv.create_order(order("b"), key, now_ms=T0 + STALE_MS))[
        0
    ] is CreateResult.KEY_REUSED
    assert await redis.get(guard) == b"D\na|1|p"
    assert (await inv.create_order(order(), key, now_ms=T0 + STALE_MS))[0] is CreateResult.REPLAYED
    assert await orders_made(redis) == 1


async def test_payment_id_is_claimed_across_skus(redis: Redis, settings: Settings) -> None:
    inv = await two_phase(redis, settings)
    first, _ = await inv.create_order(order(), str(uuid.uuid4()))
    a_body = (await inv.create_order(order(), str(uuid.uuid4())))[1]
    b_body = (await inv.create_order(order("b"), str(uuid.uuid4())))[1]
    a_id = a_body.split(b'"')[3].decode()
    b_id = b_body.split(b'"')[3].decode()
    assert await inv.confirm_payment(a_id, "pay-1") is PaymentResult.ACCEPTED
    assert await inv.confirm_payment(a_id, "pay-1") is PaymentResult.REPLAYED
    assert await inv.confirm_payment(b_id, "pay-1") is PaymentResult.PAYMENT_REUSED
    # an unknown order does not keep the payment_id
    unknown = "aaaaaaaaaaaaaaaaaaaaaaaaaa.b"
    assert await inv.confirm_payment(unknown, "pay-2") is PaymentResult.UNKNOWN_ORDER
    assert await redis.exists(keys.payment_guard("pay-2")) == 0
    assert await inv.confirm_payment(b_id, "pay-2") is PaymentResult.ACCEPTED


async def test_a_payment_id_is_never_left_on_an_unknown_order(
    redis: Redis, settings: Settings
) -> None:
    """The guard was claimed for an order that does not exist (an earlier attempt whose
    answer was lost): the unknown order releases it all the same."""
    inv = await two_phase(redis, settings)
    unknown = "aaaaaaaaaaaaaaaaaaaaaaaaaa.a"
    await redis.set(keys.payment_guard("pay-9"), unknown)
    assert await inv.confirm_payment(unknown, "pay-9") is PaymentResult.UNKNOWN_ORDER
    assert await redis.exists(keys.payment_guard("pay-9")) == 0
