"""Order intake and reading orders back.

On one server an order is one create_order.lua call. In cluster mode a user's idempotency key
and the SKU live in different slots, so intake claims the key first (`docs/cluster/index.md`):
claim, order, settle; an abandoned claim is recovered by the next request with its key.
"""

from __future__ import annotations

import contextlib
import logging

import msgspec

from gateway.errors import BackendUnavailable, NotApplied, StockMoving
from gateway.schemas import OrderRequest, OrderView
from gateway.settings import Settings
from gateway.store import calls, keys
from gateway.store.buckets import Layouts, Mover
from gateway.store.calls import Call
from gateway.store.outcomes import Claim, ClaimReply, CreateResult, Fenced, OrderRead
from gateway.store.queue import place
from gateway.store.sending import Sender
from gateway.transport.replies import REDIS_FAILURES
from gateway.transport.scripts import Arg, ScriptRegistry

log = logging.getLogger("flashgate")

# a script's code as its CreateResult: a dict lookup, where CreateResult(code) runs the
# enum's Python-level __call__ on every order
CREATE_RESULTS = {int(r): r for r in CreateResult}
REFILL_TRIES = 16  # a bucketed SKU's refills for one order, each moving at least one unit
FENCED_TOKENS_KEPT = 16  # abandoned claims fenced per (user, key, SKU): recovery is rare


def accepted_member(user_id: str, idempotency_key: str) -> str:
    """The accepted-set member of one (user, key): the key is a UUID, so `:` splits them."""
    return f"{idempotency_key}:{user_id}"


class Orders:
    """Orders in and out. Every Redis failure leaves as BackendUnavailable."""

    def __init__(
        self,
        send: Sender,
        scripts: ScriptRegistry,
        settings: Settings,
        layouts: Layouts,
        mover: Mover,
        *,
        two_phase: bool,
    ) -> None:
        self.send = send
        self.layouts = layouts
        self.mover = mover
        self.two_phase = two_phase  # cluster mode's intake (tests also run it on one server)
        self._create = scripts["create_order"]
        self._claim = scripts["claim_key"]
        self._settle = scripts["settle_key"]
        self._fence = scripts["fence_key"]
        self._read = scripts["read_order"]
        self._resending = send.resending
        self._acked = send.acked  # what a 202 promises runs on this (WAITAOF when asked)
        self._bucket_counts = layouts.counts  # read on the hot path without a call
        self._hold_ttl_ms = settings.hold_ttl_s * 1000
        self._idem_ttl_ms = settings.idempotency_ttl_s * 1000
        self._queue_max = settings.queue_max
        self._stale_ms = settings.claim_stale_ms
        self._durable = send.durable

    async def create_order(
        self,
        req: OrderRequest,
        idempotency_key: str,
        *,
        queue_only: bool = False,
        now_ms: int | None = None,
    ) -> tuple[CreateResult, bytes]:
        """Hold stock for one order (or, queue_only, just enqueue it): one round trip on one
        server; in cluster mode three (claim, order, settle; see `_create_two_phase`). A
        bucketed SKU's order goes to the shopper's bucket, refilled from the others when short.

        Returns (result, payload); the payload is described in lua/create_order.lua.
        """
        count = self._bucket_counts.get(req.sku_id, 1)
        if count > 1 or self.two_phase:
            return await self._create_placed(req, idempotency_key, count, queue_only, now_ms)
        # the flood's path on one server: no coroutine between here and the script
        tag = req.sku_id
        order_id = keys.new_order_id(tag)
        ks, args = self._lists(req, idempotency_key, tag, order_id, 1, queue_only, now_ms)
        try:  # `Sender.resending`, inlined: the script is awaited right here
            code, payload = await self._create(self._acked, ks, args)
        except REDIS_FAILURES as exc:
            code, payload = await self.send.resend(exc, self._create, ks, args)
        if code != CreateResult.LAYOUT:
            return CREATE_RESULTS[code], payload
        return await self._relayout(req, idempotency_key, int(payload), queue_only, now_ms)

    def _lists(
        self,
        req: OrderRequest,
        idempotency_key: str,
        tag: str,
        order_id: str,
        count: int,
        queue_only: bool,
        now_ms: int | None,
        claim_token: str = "",
        replay_only: bool = False,
    ) -> Call:
        """create_order.lua's call for one order on the bucket `tag` of a SKU with `count`."""
        user_id = req.user_id
        return calls.create_order(  # positional, in ARGV order: see the builder
            keys.sku_keys(tag),
            idempotency_key,
            not self.two_phase,  # guarded
            order_id,
            user_id,
            req.sku_id,
            req.quantity,
            req.promotion_id,
            req.fingerprint(),
            self._hold_ttl_ms,
            self._idem_ttl_ms,
            now_ms,
            "queue" if queue_only else "hold",
            self._queue_max,
            accepted_member(user_id, idempotency_key),
            claim_token,
            replay_only,
            count,  # buckets
            self._durable,
        )

    def _place(self, req: OrderRequest, count: int) -> tuple[str, list[str] | None, int]:
        """The shopper's bucket of a SKU with `count` buckets: (its tag, every bucket's tag or
        None when not bucketed, its index)."""
        if count == 1:
            return req.sku_id, None, 0
        tags = self.layouts.tags(req.sku_id, count)
        bucket = keys.bucket_of(req.user_id, count)
        return tags[bucket], tags, bucket

    async def _relayout(
        self, req: OrderRequest, key: str, count: int, queue_only: bool, now_ms: int | None
    ) -> tuple[CreateResult, bytes]:
        """The SKU has `count` stock buckets, which this process did not know: ask again."""
        self.layouts.remember(req.sku_id, count)
        return await self._create_placed(req, key, count, queue_only, now_ms, relayout=False)

    async def _create_placed(
        self,
        req: OrderRequest,
        key: str,
        count: int,
        queue_only: bool,
        now_ms: int | None,
        *,
        relayout: bool = True,
    ) -> tuple[CreateResult, bytes]:
        """`create_order` of a bucketed SKU or in cluster mode."""
        tag, tags, bucket = self._place(req, count)
        order_id = keys.new_order_id(tag)
        result, payload = await self._send(req, key, tag, order_id, count, queue_only, now_ms)
        if relayout and result is CreateResult.LAYOUT:
            return await self._relayout(req, key, int(payload), queue_only, now_ms)
        # The shopper's bucket is short: move stock in from the others, then decide again
        # (the refusal left no trace); other shoppers of the bucket may take what came first.
        # Nothing moved: every other bucket was empty, and a last look at this one (where
        # other shoppers' refills may have just put stock) decides.
        tries = REFILL_TRIES
        while result is CreateResult.SOLD_OUT and tags is not None and not queue_only:
            if not tries:  # stock kept moving to other shoppers: not known to be sold out
                raise StockMoving()
            need = req.quantity - int(payload)
            moved = await self.send.run(self.mover.refill(tags, bucket, need))
            if moved < 0:
                raise StockMoving()  # a transfer stayed in flight: ask again shortly
            result, payload = await self._send(req, key, tag, order_id, count, queue_only, now_ms)
            tries -= 1
            if not moved:
                break
        return result, payload

    async def _send(
        self,
        req: OrderRequest,
        key: str,
        tag: str,
        order_id: str,
        count: int,
        queue_only: bool,
        now_ms: int | None,
    ) -> tuple[CreateResult, bytes]:
        if self.two_phase:
            return await self._create_two_phase(req, key, tag, order_id, count, queue_only, now_ms)
        ks, args = self._lists(req, key, tag, order_id, count, queue_only, now_ms)
        code, payload = await self._resending(self._create, ks, args)
        return CREATE_RESULTS[code], payload

    async def _create_two_phase(
        self,
        req: OrderRequest,
        key: str,
        tag: str,
        order_id: str,
        count: int,
        queue_only: bool,
        now_ms: int | None,
    ) -> tuple[CreateResult, bytes]:
        """Intake where the user's key and the SKU are in different slots: claim (user, key)
        in the user's slot, run the SKU's script, settle the claim (accepted, or released for
        a refusal). A gateway that dies between phases leaves a claim that the next request
        with that key recovers once it is `claim_stale_ms` old: the abandoned request's token
        is fenced on its SKU first, so a late delivery of it can never add a second order."""
        guard = keys.key_guard(req.user_id, key)
        fingerprint = req.fingerprint()
        token = order_id.partition(".")[0]  # unique to this request
        claim = calls.claim_key(
            guard,
            token=token,
            fingerprint=fingerprint,
            stale_ms=self._stale_ms,
            ttl_ms=self._idem_ttl_ms,
            now_ms=now_ms,
        )
        for _ in range(3):
            reply = ClaimReply.of(await self._resending(self._claim, *claim))
            if reply.code is Claim.STALE:
                await self._recover(req.user_id, key, reply.token, reply.fingerprint)
                continue
            if reply.code is Claim.KEY_REUSED:
                return CreateResult.KEY_REUSED, b""
            if reply.code is Claim.IN_USE:
                return CreateResult.IN_USE, b""
            # DONE_SAME, PENDING_SAME: an order exists or is being made: only a replay answers
            replay = reply.code is not Claim.CLAIMED
            ks, args = self._lists(
                req,
                key,
                tag,
                order_id,
                count,
                queue_only,
                now_ms,
                claim_token="" if replay else token,
                replay_only=replay,
            )
            if replay:
                code, payload = await self._resending(self._create, ks, args)
                return CreateResult(code), payload
            return await self._decide_claimed(guard, token, fingerprint, ks, args)
        return CreateResult.IN_USE, b""

    async def _decide_claimed(
        self, guard: str, token: str, fingerprint: str, ks: list[str], args: list[Arg]
    ) -> tuple[CreateResult, bytes]:
        """Phase two and three: the SKU's script with the claim's token, then the settle."""
        try:
            code, payload = await self._resending(self._create, ks, args)
        except NotApplied:
            # surely not run (no connection, or its slot is moving): the claim goes, so the
            # shopper's retry is decided afresh instead of waiting for it to go stale
            with contextlib.suppress(BackendUnavailable):
                await self._settle_claim(guard, token, False, fingerprint)
            raise
        result = CreateResult(code)
        if result is not CreateResult.CLAIM_LOST:
            accepted = result in (CreateResult.CREATED, CreateResult.REPLAYED)
            try:
                await self._settle_claim(guard, token, accepted, fingerprint)
            except BackendUnavailable:
                # the answer stands: the claim is recovered once stale (its order is found)
                log.warning("idempotency claim not settled; recovered when stale")
        return result, payload

    async def _settle_claim(self, guard: str, token: str, done: bool, fingerprint: str) -> None:
        settle = calls.settle_key(
            guard,
            token=token,
            outcome="done" if done else "release",
            fingerprint=fingerprint,
            ttl_ms=self._idem_ttl_ms,
        )
        await self._resending(self._settle, *settle)

    async def _recover(
        self, user_id: str, idempotency_key: str, token: str, fingerprint: str
    ) -> None:
        """Settle an abandoned claim: fence its token on its SKU (or find its order there),
        then mark the claim accepted or release it."""
        sku_id = fingerprint.partition("|")[0]
        count = await self.send.run(self.layouts.count(sku_id)) or 1
        tag = self.layouts.tags(sku_id, count)[keys.bucket_of(user_id, count)]
        record = keys.SkuKeys(tag).idempotency(user_id, idempotency_key)
        fence = calls.fence_key(
            record, token=token, ttl_ms=self._idem_ttl_ms, tokens_kept=FENCED_TOKENS_KEPT
        )
        exists = Fenced(await self._resending(self._fence, *fence)) is Fenced.ORDER_EXISTS
        await self._settle_claim(
            keys.key_guard(user_id, idempotency_key), token, exists, fingerprint
        )
        log.warning(
            "recovered an abandoned idempotency claim of user %s on SKU %s (%s)",
            user_id,
            sku_id,
            "its order exists" if exists else "no order: fenced",
        )

    async def get_order(self, order_id: str) -> OrderView | None:
        """The order's record and, while it is QUEUED, its place in its bucket's queue: one
        script call (read_order.lua), O(1) whatever the queue's length."""
        parts = keys.split_order_id(order_id)
        if parts is None:
            return None
        sk = keys.SkuKeys(parts[1])
        ks, args = calls.read_order(sk.order(order_id), sk)
        read = OrderRead.of(await self.send.script(self._read, ks, args))
        if not read.record:
            return None
        *fields, opens_at = read.record  # opens_at: pre-queued for a fair start
        status, user_id, sku_id, quantity, promotion_id, created_at, deadline, history = fields
        return OrderView(
            order_id=order_id,
            status=status.decode(),
            user_id=user_id.decode(),
            sku_id=sku_id.decode(),
            quantity=int(quantity),
            promotion_id=promotion_id.decode(),
            created_at=int(created_at),
            hold_expires_at=int(deadline) if deadline is not None else None,
            history=msgspec.Raw(history),
            opens_at=int(opens_at) if opens_at is not None else None,
            queue=place(read.queue) if read.queue else None,
        )

    async def accepted_since(self, sku_id: str, since_ms: float) -> tuple[set[str], float]:
        """Members `<key>:<user>` of the SKU's accepted sets (every bucket's) whose replay
        deadline is at or after `since_ms`, and the latest deadline seen (to ask only for
        newer ones next time)."""
        members: set[str] = set()
        latest = since_ms
        redis = self.send.redis
        for tag in await self.send.run(self.layouts.all_tags(sku_id)):
            raw = await self.send.run(
                redis.zrangebyscore(keys.SkuKeys(tag).accepted, since_ms, "+inf", withscores=True)
            )
            latest = max((score for _, score in raw), default=latest)
            members.update(m.decode() for m, _ in raw)
        return members, latest
