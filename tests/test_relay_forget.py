"""`flashgate relay --forget` against a real server (and a real cluster): a retired target's
group destroyed on every events stream, so the trim goes below it, while the live target's group,
the finalizers' group and the retired target's dead letters stay as they were."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.ops import cli
from gateway.settings import Settings
from gateway.store import keys, relaylag
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.relay.forget import Alive, forget_group, target_group
from gateway.workers.relay.loop import Relay, group_for
from gateway.workers.relay.webhook import WebhookTarget
from gateway.workers.trim import trim_stream
from tests.support.processes import flashgate
from tests.support.receiver import Receiver
from tests.support.relaying import SECRET, Orders, entries, make_relay
from tests.support.state import BOTH_BACKENDS, snapshot

OLD_URL = "http://old-erp.example/hooks/flashgate"
STREAMS = [keys.SkuKeys(t).events for t in ("sa", "hot", *keys.bucket_tags("hot", 2)[1:])]


def retired_relay(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, receiver: Receiver
) -> Relay:
    """A relay of another target (the old URL's group), delivering to the same receiver."""
    target = WebhookTarget(receiver.url, SECRET, timeout_s=2.0)
    return Relay(redis, scripts, settings, target, group=group_for("webhook", OLD_URL))


async def reported_relay(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, receiver: Receiver
) -> Relay:
    """A relay that found its streams and wrote its lag figures (as a running relay does each
    second), its target closed: the group looks alive for 30 s after."""
    relay = make_relay(redis, scripts, settings, receiver)
    await relay.refresh_streams()
    await relay.measure_lag()
    await relay.target.close()
    return relay


async def groups(redis: Redis, stream: str) -> dict[str, dict[str, Any]]:
    return {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}


def now_ms() -> int:
    return int(time.time() * 1000)


@BOTH_BACKENDS
async def test_forgetting_a_target_frees_the_trim_and_keeps_the_rest(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 4)
    await orders.confirmed("hot", 3, buckets=2)
    live = make_relay(redis, scripts, settings, receiver)
    old = retired_relay(redis, scripts, settings.replace(relay_prefetch=2), receiver)
    await live.refresh_streams()
    await old.refresh_streams()
    assert sorted(old.streams) == sorted(STREAMS)
    sa = old.streams[keys.SkuKeys("sa").events]
    (first,) = (await redis.xreadgroup(live.group, "x", {sa.key: ">"}, count=1))[0][1]
    await live.dead_letter(sa, first, "refused 10 times: HTTP 500")  # the live target's
    assert await live.drain() == 6
    await live.measure_lag()  # fresh figures: the live target's relays report
    assert await old.step(sa) == 2  # the old target confirmed two of sa's four events
    held = await redis.xreadgroup(old.group, "gone", {sa.key: ">"}, count=2)
    third, fourth = held[0][1]  # handed to a relay of it that died: pending
    await old.dead_letter(sa, fourth, "refused 10 times: HTTP 422")
    await relaylag.write(redis, relaylag.RelayLag(old.group, "webhook", 1, 1, now_ms() - 600_000))
    await old.target.close()
    await live.target.close()

    assert await trim_stream(redis, sa.key) == 2  # held at the old group's pending entry
    for stream in STREAMS[1:]:
        assert await trim_stream(redis, stream) == 0  # the old group was handed nothing there
    live_before = {s: (await groups(redis, s))[live.group] for s in STREAMS}
    finalizers = {t: await groups(redis, keys.SkuKeys(t).stream) for t in ("sa", "hot")}
    dead = await entries(redis, keys.SkuKeys("sa").relay_dead)
    assert len(dead) == 2

    done = await forget_group(redis, old.group, now_ms=now_ms())
    assert sorted(done.streams) == sorted((s, 1 if s == sa.key else 0) for s in STREAMS)
    assert done.pending == 1 and done.figures
    assert done.dead == [("sa", keys.SkuKeys("sa").relay_dead, 1)]
    for stream in STREAMS:
        assert await groups(redis, stream) == {live.group: live_before[stream]}
    for tag, found in finalizers.items():
        assert await groups(redis, keys.SkuKeys(tag).stream) == found
        assert keys.FINALIZER_GROUP in found
    assert await entries(redis, keys.SkuKeys("sa").relay_dead) == dead
    assert await redis.hget(keys.RELAY_LAG, old.group) is None
    assert await relaylag.read(redis, live.group) is not None

    assert await trim_stream(redis, sa.key) == 2  # below where the old group stood
    assert await redis.xlen(sa.key) == 0
    for stream in STREAMS[1:]:
        await trim_stream(redis, stream)
        assert await redis.xlen(stream) == 0

    again = await forget_group(redis, old.group, now_ms=now_ms())
    assert not again.found and again.dead == done.dead


@BOTH_BACKENDS
async def test_a_group_whose_relay_reported_is_refused_unless_forced(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 2)
    relay = await reported_relay(redis, scripts, settings, receiver)
    at_ms = (await relaylag.read(redis, relay.group) or pytest.fail("no figures")).at_ms
    before = await snapshot(redis)
    with pytest.raises(Alive, match="reported 30 s ago"):
        await forget_group(redis, relay.group, now_ms=at_ms + 30_000)
    assert await snapshot(redis) == before

    done = await forget_group(redis, relay.group, now_ms=at_ms + 30_000, force=True)
    assert done.streams == [(keys.SkuKeys("sa").events, 0)] and done.figures
    assert await redis.xinfo_groups(keys.SkuKeys("sa").events) == []


async def test_figures_older_than_30_s_are_no_relay_alive(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 1)
    relay = await reported_relay(redis, scripts, settings, receiver)
    at_ms = (await relaylag.read(redis, relay.group) or pytest.fail("no figures")).at_ms
    done = await forget_group(redis, relay.group, now_ms=at_ms + 30_001)
    assert done.streams == [(keys.SkuKeys("sa").events, 0)] and done.figures


async def test_only_a_relay_group_is_forgotten(redis: Redis, orders: Orders) -> None:
    await orders.confirmed("sa", 1)
    before = await snapshot(redis)
    for group in (keys.FINALIZER_GROUP, "erp-reader", ""):
        with pytest.raises(ValueError, match="is not a relay group"):
            await forget_group(redis, group, now_ms=now_ms())
    assert await snapshot(redis) == before


def test_the_group_comes_from_the_target_url() -> None:
    webhook = Settings(relay_url=OLD_URL, relay_secret=SECRET)
    assert target_group(webhook) == group_for("webhook", OLD_URL)
    broker = Settings(relay_url="amqp://guest:guest@mq:5672/")
    assert target_group(broker) == group_for("rabbitmq", "amqp://mq:5672/")


@pytest.mark.timeout(60)
async def test_the_forget_command(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 2)
    relay = await reported_relay(redis, scripts, settings, receiver)
    env = {"REDIS_URL": settings.redis_url or "", "FLASHGATE_RELAY_SECRET": SECRET}

    def run(*args: str, **more: str) -> Any:
        return asyncio.to_thread(flashgate, "relay", "--forget", *args, **env, **more)

    refused = await run(FLASHGATE_RELAY_URL=receiver.url)
    assert refused.returncode == 1, refused.stderr
    assert f"a relay of {relay.group} reported" in refused.stderr
    assert "stop its relays first" in refused.stderr and "--force" in refused.stderr
    assert await redis.xinfo_groups(keys.SkuKeys("sa").events) != []

    forced = await run("--force", FLASHGATE_RELAY_URL=receiver.url)
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.splitlines()
    assert lines[-1] == f"{relay.group} forgotten: 1 events stream(s), 0 pending entries dropped"
    assert await redis.xinfo_groups(keys.SkuKeys("sa").events) == []

    missing = await run("--group", relay.group)
    assert missing.returncode == 1
    assert f"{relay.group} is on no events stream" in missing.stderr
    wrong = await run("--group", keys.FINALIZER_GROUP)
    assert wrong.returncode == 2 and "is not a relay group" in wrong.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--group", "relay:webhook:0"], "--group and --force go with --forget"),
        (["--force"], "--group and --force go with --forget"),
        (["--forget", "--sku", "sa"], "--forget retires the group on every SKU"),
        (["--forget", "--replay-dead"], "not allowed with argument"),
    ],
)
def test_forget_arguments_out_of_place_are_refused(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["relay", *args])
    assert exited.value.code == 2 and said in capsys.readouterr().err
