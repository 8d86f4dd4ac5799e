"""The relay's lag against a real server and a real receiver: events not yet confirmed by its
group and the age of the oldest, measured by the relay, written to `fg:{mode}:relay-lag`, read by
`/metrics` and the console without measuring anything."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.ops import status
from gateway.settings import Settings
from gateway.store import keys, relaylag
from gateway.store.figures import Sampler
from gateway.transport.connect import PipelineBatch
from gateway.transport.scripts import ScriptRegistry
from tests.support.api import ADMIN, Client
from tests.support.receiver import Receiver
from tests.support.relaying import Orders, entries, make_relay, until
from tests.support.state import BOTH_BACKENDS


async def scraped(app: Client) -> dict[str, float]:
    """The relay figures of one /metrics scrape: metric name -> value (one group here)."""
    text = (await app.get("/metrics")).text
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.name in ("flashgate_relay_lag", "flashgate_relay_oldest_unconfirmed_seconds")
        for s in f.samples
    }


@BOTH_BACKENDS
async def test_the_lag_rises_with_unconfirmed_events_and_falls_to_zero(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    app = orders.client
    await orders.confirmed("sa", 5)
    await orders.confirmed("hot", 6, buckets=2)
    relay = make_relay(redis, scripts, settings, receiver)
    await relay.refresh_streams()
    first = await relay.measure_lag()
    assert first.events == 11 and len(relay.streams) == 3
    oldest = min(int(e[0].decode().split("-")[0]) for e in await entries(redis, "fg:{sa}:events"))
    assert first.oldest_ms <= oldest and first.oldest_ms > time.time() * 1000 - 60_000
    assert (await scraped(app))["flashgate_relay_lag"] == 11
    assert (await scraped(app))["flashgate_relay_oldest_unconfirmed_seconds"] > 0

    assert await relay.drain() == 11
    assert await relay.measure_lag() == type(first)(0, 0)
    now = await scraped(app)
    assert now == {"flashgate_relay_lag": 0, "flashgate_relay_oldest_unconfirmed_seconds": 0}
    view = (await app.get("/api/v1/admin/console", headers=ADMIN)).json()
    assert view["relays"] == [
        {"group": relay.group, "target": "webhook", "lag": 0, "oldest_unconfirmed_s": 0.0}
    ]
    await relay.target.close()


async def test_the_oldest_unconfirmed_ages_while_the_receiver_refuses(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    app = orders.client
    await orders.confirmed("sa", 3)
    receiver.refuse_every = 1
    relay = make_relay(redis, scripts, settings.replace(relay_max_attempts=1000), receiver)
    task = asyncio.create_task(relay.run())
    try:
        await until(lambda: relay.retries >= 3 and relay.lag.events == 3)
        await asyncio.sleep(0.05)
        sample = await Sampler(PipelineBatch(redis), ScriptRegistry(), max_age_s=0).sample()
        (lag,) = sample.relays
        assert lag.lag == 3 and lag.group == relay.group and lag.target == "webhook"
        assert lag.oldest_age_s(int(time.time() * 1000)) > 0
        view = (await app.get("/api/v1/admin/console", headers=ADMIN)).json()
        assert view["relays"][0]["lag"] == 3 and view["relays"][0]["oldest_unconfirmed_s"] > 0
        shown = status.render(sample, sample)  # `flashgate status`
        assert f"relay webhook ({relay.group}): lag 3, oldest unconfirmed " in shown[-1]
        receiver.refuse_every = 0
        await until(lambda: len(receiver.received()) == 3)
        await until(lambda: relay.lag.events == 0, timeout_s=5)
        assert relay.lag.oldest_ms == 0
    finally:
        relay.stop()
        await task


async def test_a_lag_redis_cannot_tell_is_counted(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    """XINFO GROUPS answers a nil lag once an entry after the group's position is deleted:
    the entries after it are counted instead."""
    await orders.confirmed("sa", 4)
    relay = make_relay(redis, scripts, settings, receiver)
    await relay.refresh_streams()
    stream = keys.SkuKeys("sa").events
    ids = [e[0] for e in await entries(redis, stream)]
    await redis.xdel(stream, ids[1])
    (group,) = await redis.xinfo_groups(stream)
    assert group["lag"] is None
    lag = await relay.measure_lag()
    assert lag.events == 3 and lag.oldest_ms == int(ids[0].decode().split("-")[0])
    await relay.drain()
    assert (await relay.measure_lag()).events == 0
    await relay.target.close()


def test_figures_not_rewritten_for_a_while_are_left_out() -> None:
    now = 1_800_000_000_000
    fresh = relaylag.RelayLag("relay:webhook:1", "webhook", 4, now - 2500, now - 1000)
    stale = relaylag.RelayLag("relay:rabbitmq:2", "rabbitmq", 9, now - 99_000, now - 31_000)
    raw = {}
    for f in (fresh, stale):
        raw[f.group.encode()] = relaylag._encode(
            relaylag._Stored(f.target, f.lag, f.oldest_ms, f.at_ms)
        )
    raw[b"relay:junk"] = b"not json"
    assert relaylag.parse(raw, now) == [fresh]
    assert relaylag.parse(raw, now, stale=True) == [stale]
    assert fresh.oldest_age_s(now) == 2.5
    assert relaylag.parse(None, now) == []


async def test_status_names_a_group_no_relay_reports_for(redis: Redis) -> None:
    """A target whose relays are gone (its URL changed, its relay retired): /metrics leaves its
    frozen lag out, `flashgate status` says its group still holds the events streams."""
    now = int(time.time() * 1000)
    gone = relaylag.RelayLag("relay:rabbitmq:2", "rabbitmq", 9, now - 700_000, now - 600_000)
    await relaylag.write(redis, gone)
    sample = await Sampler(PipelineBatch(redis), ScriptRegistry(), max_age_s=0).sample()
    assert sample.relays == [] and sample.silent == [gone]
    shown = status.render(sample, sample)
    assert shown[-1].startswith(
        "relay rabbitmq (relay:rabbitmq:2): no relay reported for 10 min; its group keeps the "
        "events streams from being trimmed"
    ), shown
    assert shown[-1].endswith("retire it with `flashgate relay --forget --group relay:rabbitmq:2`")
