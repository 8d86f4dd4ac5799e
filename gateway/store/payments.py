"""Payment confirmations: recorded durably, once per payment_id, and queued for the finalizers."""

from __future__ import annotations

from gateway.store import calls, keys
from gateway.store.outcomes import PaymentResult
from gateway.store.sending import Sender
from gateway.transport.replies import text
from gateway.transport.scripts import ScriptRegistry


class Payments:
    def __init__(self, send: Sender, scripts: ScriptRegistry, *, two_phase: bool) -> None:
        self.send = send
        self.two_phase = two_phase
        self._confirm = scripts["confirm_payment"]
        self._claim_guard = scripts["claim_guard"]
        self._release = scripts["release_guard"]

    async def confirm_payment(
        self, order_id: str, payment_id: str, *, now_ms: int | None = None
    ) -> PaymentResult:
        """Record one payment confirmation durably and queue it for the finalizers."""
        parts = keys.split_order_id(order_id)
        if parts is None:
            return PaymentResult.UNKNOWN_ORDER
        sk = keys.SkuKeys(parts[1])
        guard = keys.payment_guard(payment_id)
        resending = self.send.resending
        confirm = calls.confirm_payment(
            sk,
            None if self.two_phase else guard,
            payment_id=payment_id,
            order_id=order_id,
            now_ms=now_ms,
            durable=self.send.durable,
        )
        if not self.two_phase:
            (code,) = await resending(self._confirm, *confirm)
            return PaymentResult(code)
        # Cluster mode: the payment_id is claimed in its own slot first. A crash in between
        # leaves it claimed for this order, which is what a retry of it needs.
        claim = calls.claim_guard(guard, value=order_id)
        first = text(await resending(self._claim_guard, *claim))
        if first and first != order_id:
            return PaymentResult.PAYMENT_REUSED
        (code,) = await resending(self._confirm, *confirm)
        result = PaymentResult(code)
        if result is PaymentResult.UNKNOWN_ORDER:  # never bound to an order that is not there
            release = calls.release_guard(guard, value=order_id)
            await resending(self._release, *release)  # Released: either way not bound
        return result
