"""Final events made the real way for the relay's tests: SKUs and orders through the app,
decided by the real finalizer, paid through the signed payment endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from gateway.settings import Settings
from gateway.store import keys
from gateway.store.buckets import Layouts
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.finalizer import Finalizer
from gateway.workers.relay.events import event_id
from gateway.workers.relay.loop import Relay, group_for
from gateway.workers.relay.webhook import WebhookTarget
from tests.support.api import Client, create, put_sku
from tests.support.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"relay-test-secret-0123456789abcd").decode()
PAYMENT_SECRET = "test-payment-secret"


class Orders:
    """Confirmed orders of SKUs made through `client` (an app with PAYMENT_SECRET)."""

    def __init__(self, redis: Redis, scripts: ScriptRegistry, settings: Settings, client: Client):
        self.redis = redis
        self.client = client
        self.finalizer = Finalizer(redis, scripts, settings, name="fin")
        self.finalizer.claim_every_s = 0.0
        self.users = 0

    async def finalize(self) -> None:
        await self.finalizer.refresh_streams()  # SKUs made since its last look
        while await self.finalizer.step(block=False):
            pass

    async def confirmed(self, sku_id: str, count: int, *, buckets: int = 1) -> list[str]:
        """Configure `sku_id` and confirm `count` orders of it; returns their ids."""
        r = await put_sku(self.client, sku_id, stock=count, per_user_limit=1, buckets=buckets)
        assert r.status_code in (200, 201), r.text
        oids = []
        for _ in range(count):
            self.users += 1
            r = await create(self.client, sku_id=sku_id, user_id=f"u{self.users}")
            assert r.status_code == 202, r.text
            oids.append(r.json()["order_id"])
        await self.finalize()
        for i, oid in enumerate(oids):
            body = json.dumps({"order_id": oid, "payment_id": f"pay-{sku_id}-{i}"}).encode()
            sig = hmac.new(PAYMENT_SECRET.encode(), body, hashlib.sha256).hexdigest()
            headers = {"X-Signature": sig, "Content-Type": "application/json"}
            r = await self.client.post("/api/v1/payment/confirm", content=body, headers=headers)
            assert r.status_code == 202, r.text
        await self.finalize()
        return oids


async def entries(redis: Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """A stream's entries, typed."""
    found: Any = await redis.xrange(stream)
    return [(entry_id, fields) for entry_id, fields in found]


async def event_ids(redis: Redis) -> dict[str, str]:
    """Every event now in an events stream: its id -> its stream key."""
    out: dict[str, str] = {}
    layouts = Layouts(redis)
    registry: Any = await redis.smembers(keys.SKU_REGISTRY)
    for raw in registry:
        sku_id = raw.decode()
        for bucket, tag in enumerate(await layouts.all_tags(sku_id)):
            stream = keys.SkuKeys(tag).events
            for entry_id, _ in await entries(redis, stream):
                out[event_id(sku_id, bucket, entry_id.decode())] = stream
    return out


def make_relay(
    redis: Redis,
    scripts: ScriptRegistry,
    settings: Settings,
    receiver: Receiver,
    *,
    name: str | None = None,
    timeout_s: float = 2.0,
) -> Relay:
    target = WebhookTarget(receiver.url, SECRET, timeout_s=timeout_s)
    return Relay(
        redis,
        scripts,
        settings,
        target,
        group=group_for("webhook", receiver.url),
        rng=random.Random(7),
        backoff_s=0.005,
        name=name,
    )


async def until(done: Callable[[], bool], timeout_s: float = 8.0) -> None:
    """Wait (polling) until `done()`; fails after `timeout_s`."""
    for _ in range(int(timeout_s / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not done in time")
