"""Intake: the order path's policy, without HTTP and without the wire.

`Intake.create(order, key, client)` decides one order in this order: the sold-out memo (no
Redis round trip for a SKU known sold out), the user's and the client address's buckets
(`keyed.py`, while a limit is on), the instance's token bucket, the circuit breaker, then the
order script (`store`), whose latency feeds the breaker. A refusal leaves as the
`GatewayError` the contract names; an accepted order returns the stored answer's bytes.
"""

from __future__ import annotations

import logging
import math

from gateway import errors
from gateway.intake.breaker import CircuitBreaker, State
from gateway.intake.keyed import KeyedBuckets
from gateway.intake.limiter import TokenBucket
from gateway.intake.mode import NoticeWatcher
from gateway.intake.soldout import SoldOutMemo
from gateway.schemas import Mode, OrderRequest
from gateway.store.inventory import Inventory
from gateway.store.orders import accepted_member
from gateway.store.outcomes import CreateResult
from gateway.telemetry import metrics

log = logging.getLogger("flashgate")


class Intake:
    """One process's order intake. `create` is the flood's path: no coroutine between it and
    the store's script call, nothing allocated beyond what the answer needs."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        limiter: TokenBucket,
        keyed: KeyedBuckets,
        breaker: CircuitBreaker,
        memo: SoldOutMemo,
        watcher: NoticeWatcher,
    ) -> None:
        self.inventory = inventory
        self.limiter = limiter
        self.keyed = keyed
        self.breaker = breaker
        self.memo = memo
        self.watcher = watcher

    async def create(
        self, req: OrderRequest, key: str, client: str = ""
    ) -> tuple[CreateResult, bytes]:
        """Decide one order from `client` (its address, "" unknown). Returns (CREATED or
        REPLAYED, the stored answer's JSON bytes); a refusal raises. REPLAYED: the same
        (user, key) was answered before, this is that answer."""
        queue_only = self.watcher.mode is Mode.QUEUE_ONLY
        if not queue_only and self.memo.refuses(
            req.sku_id, req.promotion_id, accepted_member(req.user_id, key)
        ):
            raise errors.SoldOut(available=0)
        if self.keyed.on:
            limit, wait_s = self.keyed.take(req.user_id, client)
            if limit:
                metrics.CLIENT_REFUSALS.labels(limit).inc()
                raise errors.ClientRateLimited(retry_after_s=max(1, math.ceil(wait_s)), limit=limit)
        wait_s = self.limiter.take()
        if wait_s > 0:
            metrics.BUCKET_REFUSALS.inc()
            raise self.rate_limited(wait_s)
        breaker = self.breaker
        if not breaker.allow():
            raise errors.BreakerOpen(retry_after_s=breaker.retry_after_s())
        started = breaker.clock()
        failed = True
        try:
            outcome = await self.inventory.create_order(req, key, queue_only=queue_only)
            failed = False
        except errors.StockMoving:
            failed = False  # Redis answered: not the breaker's business
            raise
        finally:
            elapsed = breaker.clock() - started
            breaker.record(elapsed, failed=failed)
            metrics.observe(metrics.SCRIPT_LATENCY, "create_order", elapsed)
        result, payload = outcome
        if result is CreateResult.CREATED:
            self.memo.forget(req.sku_id)  # if this was a re-check: stock came back
            return outcome  # the store's own tuple: nothing allocated here
        if result is CreateResult.REPLAYED:
            return outcome
        if result is CreateResult.SOLD_OUT:
            available = int(payload)
            if available == 0 and not queue_only:
                await self.learn_sold_out(req.sku_id, req.promotion_id)
            raise errors.SoldOut(available=available)
        raise refusal(result, payload)

    def rate_limited(self, wait_s: float) -> errors.RateLimited:
        """429 with Retry-After from the refill and the IETF RateLimit headers."""
        retry = max(1, math.ceil(wait_s))
        policy = f'"intake";q={max(1, round(self.limiter.rate))};w=1'
        return errors.RateLimited(
            retry_after_s=retry,
            headers={"RateLimit-Policy": policy, "RateLimit": f'"intake";r=0;t={retry}'},
        )

    async def learn_sold_out(self, sku_id: str, promotion_id: str) -> None:
        """Remember a sold-out SKU, with the accepted shoppers whose replays must still pass."""
        try:
            accepted, until_ms = await self.inventory.accepted_since(
                sku_id, self.memo.accepted_since(sku_id)
            )
        except errors.BackendUnavailable:
            return  # not remembered: the next request asks Redis again
        self.memo.sold_out(sku_id, promotion_id, accepted, until_ms)


class Starting(Intake):
    """The intake of a process that has not yet read the mode and the rules from Redis (it
    started while Redis was down): every order is `503 unavailable`, without touching Redis.
    `web/services.py` swaps in the real `Intake` once Redis answered, so the order path
    checks nothing per request."""

    @classmethod
    def like(cls, intake: Intake) -> Starting:
        """A starting intake on `intake`'s collaborators."""
        return cls(
            intake.inventory,
            limiter=intake.limiter,
            keyed=intake.keyed,
            breaker=intake.breaker,
            memo=intake.memo,
            watcher=intake.watcher,
        )

    async def create(
        self, req: OrderRequest, key: str, client: str = ""
    ) -> tuple[CreateResult, bytes]:
        raise errors.BackendUnavailable(reason="starting: Redis has not answered yet")


def refusal(result: CreateResult, payload: bytes) -> errors.GatewayError:
    """The contract's error for a refusal the order script answered."""
    if result is CreateResult.LIMIT_EXCEEDED:
        return errors.LimitExceeded()
    if result is CreateResult.UNKNOWN_SKU:
        return errors.UnknownSku()
    if result is CreateResult.NOT_ACTIVE:
        reason = payload.decode()
        text = "the sale has not started" if reason == "not_started" else "the sale has ended"
        return errors.SaleNotActive(text, reason=reason)
    if result is CreateResult.QUEUE_FULL:
        return errors.QueueFull(backlog=int(payload))
    if result in (CreateResult.IN_USE, CreateResult.CLAIM_LOST):
        return errors.KeyInUse(headers={"Retry-After": "1"})
    return errors.KeyReused()


def log_transition(old: State, new: State) -> None:
    """The breaker's transitions, logged and counted."""
    log.warning("circuit breaker %s -> %s", old.value, new.value)
    metrics.worker().breaker.set(metrics.BREAKER_CODES[new.value])
    metrics.BREAKER_TRANSITIONS.labels(new.value).inc()
