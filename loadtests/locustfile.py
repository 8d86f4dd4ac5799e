"""Locust shoppers for the 0:00 spike of a flash sale (issue #5).

Who comes: shoppers tapping "buy" once on the hot SKU or an ordinary one, polling their orders
and, a share of them, paying through the signed payment endpoint; impatient shoppers tapping 4
times within 2 s with one idempotency key; shoppers retrying refusals with new keys; a vandal
sending malformed and hostile requests; an operator flipping QUEUE_ONLY on and off. With
`FLASHGATE_LT_SCALPERS` > 0, scalpers too (one user with many keys, one address with many
users), and every shopper comes through a trusted proxy with its own `X-Forwarded-For`.

Every answer is judged against the contract. Expected refusals (409, 429, 503 with the
contract's codes) are successes, named with their status and code (`create hot [409 sold_out]`)
so the report counts them; anything else is a failure. Every 202 is appended to
`FLASHGATE_LT_ACCEPTED` (one JSON line per answer) for the runner to check that nothing was lost
or duplicated. `python -m loadtests.run` starts everything and checks the result; to aim at a
running gateway instead (its SKUs configured, see loadtests/README.md):

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8080
"""

from __future__ import annotations

import random

import gevent
from locust import FastHttpUser, LoadTestShape, constant, task

from loadtests.client import CFG, SWITCH, Client, Recorder, json_object, new_key
from loadtests.shoppers import (
    AddressScalper,
    ImpatientShopper,
    KeyScalper,
    RetryingShopper,
    Shopper,
)
from loadtests.vandal import Vandal

# What Locust runs from this file (its users and shape), and the names the queue and
# pre-queue locustfiles take from it.
__all__ = [
    "AddressScalper",
    "ImpatientShopper",
    "KeyScalper",
    "Operator",
    "RetryingShopper",
    "Shopper",
    "SpikeShape",
    "Vandal",
    "CFG",
    "Client",
    "Recorder",
    "json_object",
    "new_key",
]


class Operator(FastHttpUser):
    """Flips intake to QUEUE_ONLY and back in the middle of the run, and checks the SKU view
    (`stock == available + held + sold`) each time."""

    fixed_count = 1
    wait_time = constant(0)
    network_timeout = 20.0

    def _admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CFG.admin_token}"}

    def switch(self, mode: str) -> None:
        url = f"{SWITCH}?mode={mode}"
        with self.client.post(url, headers=self._admin(), catch_response=True) as r:
            r.request_meta["name"] = f"/order/switch [{r.status_code} {mode}]"
            got = (json_object(r.content) or {}).get("mode") if r.status_code == 200 else None
            if got != mode:
                r.failure(f"switch to {mode}: {r.status_code} {(r.content or b'')[:200]!r}")
            else:
                r.success()

    def check_sku(self, sku: str) -> None:
        url = f"/api/v1/admin/skus/{sku}"
        with self.client.get(url, headers=self._admin(), catch_response=True) as r:
            r.request_meta["name"] = f"/admin/skus/:id [{r.status_code} sku]"
            view = (json_object(r.content) or {}) if r.status_code == 200 else {}
            parts = [view.get(k) for k in ("stock", "available", "held", "sold")]
            if not all(isinstance(p, int) for p in parts):
                r.failure(f"SKU view {r.status_code} {(r.content or b'')[:200]!r}")
            elif parts[0] != parts[1] + parts[2] + parts[3] or min(parts) < 0:
                r.failure(f"SKU {sku}: stock != available + held + sold: {view}")
            else:
                r.success()

    @task
    def flip(self) -> None:
        gevent.sleep(CFG.switch_every_s * random.uniform(0.7, 1.3))
        self.switch("QUEUE_ONLY")
        gevent.sleep(CFG.queue_only_s)
        self.switch("NORMAL")
        for sku in (CFG.hot_sku, *CFG.skus):
            self.check_sku(sku)

    def on_stop(self) -> None:
        self.switch("NORMAL")


class SpikeShape(LoadTestShape):
    """0:00: from zero to `FLASHGATE_LT_USERS` in `FLASHGATE_LT_SPAWN_S` seconds, held for
    `FLASHGATE_LT_HOLD_S`; then the tail, `FLASHGATE_LT_TAIL_USERS` for `FLASHGATE_LT_TAIL_S`."""

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        rate = CFG.users / max(CFG.spawn_s, 0.001)
        if t < CFG.spawn_s + CFG.hold_s:
            return CFG.users, rate
        if t < CFG.spawn_s + CFG.hold_s + CFG.tail_s:
            return min(CFG.tail_users, CFG.users), rate
        return None
