"""The store's facade: orders, payments, SKUs and the audit over one Redis client.

`Inventory` is `Orders` (so the order path reaches the script with no call in between) with
the other parts' methods bound onto it. The result types live in `outcomes`.
"""

from __future__ import annotations

from gateway.settings import Settings
from gateway.store.audit import Audit
from gateway.store.buckets import Layouts, Mover
from gateway.store.draws import Draws
from gateway.store.orders import Orders
from gateway.store.payments import Payments
from gateway.store.sending import Sender
from gateway.store.skus import Skus
from gateway.transport.connect import Client
from gateway.transport.replies import REDIS_FAILURES
from gateway.transport.scripts import Executor, ScriptRegistry


class Inventory(Orders):
    """The gateway's view of Redis. Every Redis failure leaves as BackendUnavailable."""

    def __init__(
        self,
        redis: Client,
        scripts: ScriptRegistry,
        settings: Settings,
        *,
        fast: Executor | None = None,
        two_phase: bool | None = None,
    ) -> None:
        send = Sender(redis, settings, fast)  # scripts on `fast` when given (multiplexed)
        layouts = Layouts(redis)
        # what a 202 promises (orders, payments, stock moves) runs with WAITAOF when asked
        mover = Mover(send.acked, scripts)
        # Cluster mode: a user's key and the SKU live in different slots, so intake claims
        # the key first (docs/cluster/index.md). Tests also run it on one server.
        two_phase = settings.redis_cluster if two_phase is None else two_phase
        super().__init__(send, scripts, settings, layouts, mover, two_phase=two_phase)
        self.redis = redis
        self.fast = fast
        self.scripts = scripts
        self.settings = settings
        self.payments = Payments(send, scripts, two_phase=two_phase)
        self.skus = Skus(send, scripts, layouts, mover)
        self.audit = Audit(send, scripts, layouts)
        self.draws = Draws(send, scripts)
        # bound, not wrapped: a call through the facade adds no coroutine
        self.confirm_payment = self.payments.confirm_payment
        self.configure_sku = self.skus.configure_sku
        self.get_sku = self.skus.get_sku
        self.sku_changes = self.skus.sku_changes
        self.sku_ids = self.skus.sku_ids
        self.audit_sku = self.audit.audit_sku

    async def ping(self) -> bool:
        """Redis answers and every script is loaded (reloaded here after a restart)."""
        try:
            if not await self.redis.ping():
                return False
            if self.fast is not None:
                await self.fast.execute_command("PING")
            if not await self.scripts.loaded(self.redis):
                await self.scripts.load_all(self.redis)
            return True
        except REDIS_FAILURES:
            return False
