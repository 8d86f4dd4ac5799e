"""The relay against a real server and a real webhook receiver: final events made through the
app, the finalizer and the payment endpoint; delivered, retried, dead-lettered, shared."""

from __future__ import annotations

import asyncio

import msgspec
from redis.asyncio import Redis

from gateway.settings import Settings
from gateway.store import figures, keys
from gateway.transport.scripts import ScriptRegistry
from gateway.workers.relay.replay import replay_dead
from tests.support.receiver import Receiver
from tests.support.relaying import (
    Orders,
    entries,
    event_ids,
    make_relay,
    until,
)
from tests.support.state import BOTH_BACKENDS


def in_commit_order(receiver: Receiver) -> bool:
    """Per SKU bucket, the events were first taken in the order of their entry ids."""
    seen: dict[str, list[tuple[int, int]]] = {}
    firsts: set[str] = set()
    for d in receiver.deliveries:
        if d.status != 200 or d.id in firsts:
            continue
        firsts.add(d.id)
        stream, _, entry = d.id.rpartition("/")
        ms, _, seq = entry.partition("-")
        seen.setdefault(stream, []).append((int(ms), int(seq)))
    return all(ids == sorted(ids) for ids in seen.values())


async def pending(redis: Redis, streams: set[str], group: str) -> int:
    return sum([int((await redis.xpending(s, group))["pending"]) for s in streams])


@BOTH_BACKENDS
async def test_every_final_event_arrives_once_signed_in_order(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    for sku in ("sa", "sb"):
        await orders.confirmed(sku, 5)
    expected = await event_ids(redis)
    assert len(expected) == 10
    relay = make_relay(redis, scripts, settings, receiver)
    assert await relay.drain() == 10
    assert receiver.received().keys() == expected.keys()
    assert len(receiver.deliveries) == 10 and all(d.signed for d in receiver.deliveries)
    body = msgspec.json.decode(next(iter(receiver.received().values())))
    assert body["event"] == "CONFIRMED" and isinstance(body["history"], list)
    assert in_commit_order(receiver)
    assert await pending(redis, set(expected.values()), relay.group) == 0
    assert relay.streams.keys() >= set(expected.values())
    await relay.target.close()


@BOTH_BACKENDS
async def test_a_receiver_refusing_a_third_still_ends_with_every_event(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 9)
    expected = await event_ids(redis)
    receiver.refuse_fraction = 1 / 3
    relay = make_relay(redis, scripts, settings, receiver)
    await relay.drain()
    assert receiver.received().keys() == expected.keys()
    assert sum(d.status == 500 for d in receiver.deliveries) >= 3
    assert all(len(bodies) == 1 for bodies in receiver.bodies().values())
    assert relay.dead == 0 and in_commit_order(receiver)
    await relay.target.close()


@BOTH_BACKENDS
async def test_refused_max_attempts_times_goes_to_the_dead_letters_acknowledged(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 3)
    expected = await event_ids(redis)
    receiver.refuse_every = 1
    relay = make_relay(redis, scripts, settings.replace(relay_max_attempts=3), receiver)
    assert await relay.drain() == 3
    assert len(receiver.deliveries) == 9 and receiver.received() == {}
    dead = await entries(redis, keys.SkuKeys("sa").relay_dead)
    assert {f[b"event_id"].decode() for _, f in dead} == expected.keys()
    assert {f[b"reason"] for _, f in dead} == {b"refused 3 times: HTTP 500"}
    assert all(f[b"event"] == b"CONFIRMED" and f[b"group"] for _, f in dead)
    assert await pending(redis, set(expected.values()), relay.group) == 0
    assert relay.dead == 3

    # `flashgate dead` lists them as the relay's; `flashgate relay --replay-dead`, once the
    # receiver takes them, sends each again with the same id and empties the dead letters
    rows = await figures.dead_letters(redis, ["sa"], 10)
    assert {r[7] for r in rows} == {"relay"} and len(rows) == 3
    receiver.refuse_every = 0
    done = await replay_dead(redis, relay.target, relay.group, ["sa"])
    assert done.stopped is None and sorted(done.sent) == sorted(expected)
    assert receiver.received().keys() == expected.keys()
    assert await entries(redis, keys.SkuKeys("sa").relay_dead) == []
    assert (await replay_dead(redis, relay.target, relay.group)).sent == []
    await relay.target.close()


async def test_a_replay_stops_at_the_first_refusal_and_keeps_the_rest(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 2)
    receiver.refuse_every = 1
    relay = make_relay(redis, scripts, settings.replace(relay_max_attempts=1), receiver)
    assert await relay.drain() == 2
    other = await replay_dead(redis, relay.target, "relay:webhook:another", ["sa"])
    assert other.sent == [] and other.stopped is None  # another target's letters: untouched
    done = await replay_dead(redis, relay.target, relay.group, ["sa"])
    assert done.sent == [] and done.stopped is not None and "HTTP 500" in done.stopped
    assert len(await entries(redis, keys.SkuKeys("sa").relay_dead)) == 2
    await relay.target.close()


async def test_an_entry_that_is_not_an_event_is_dead_lettered_at_once(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 1)
    sk = keys.SkuKeys("sa")
    await redis.xadd(sk.events, {"junk": "1"})
    relay = make_relay(redis, scripts, settings, receiver)
    assert await relay.drain() == 2
    ((_, dead),) = await entries(redis, sk.relay_dead)
    assert dead[b"reason"] == b"not an event: entry has no event field" and dead[b"junk"] == b"1"
    assert len(receiver.received()) == 1
    await relay.target.close()


@BOTH_BACKENDS
async def test_a_receiver_down_then_up_dead_letters_nothing(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 4)
    expected = await event_ids(redis)
    await receiver.stop()
    relay = make_relay(redis, scripts, settings.replace(relay_max_attempts=1), receiver)
    task = asyncio.create_task(relay.run())
    await until(lambda: relay.retries >= 3)
    assert relay.delivered == 0
    await receiver.start()
    await until(lambda: receiver.received().keys() == expected.keys())
    relay.stop()
    await task
    assert relay.dead == 0 and await redis.xlen(keys.SkuKeys("sa").relay_dead) == 0


@BOTH_BACKENDS
async def test_two_relays_share_the_work_and_miss_nothing(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    for sku in ("sa", "sb", "sc", "sd"):
        await orders.confirmed(sku, 4)
    expected = await event_ids(redis)
    relays = [make_relay(redis, scripts, settings, receiver, name=n) for n in ("r1", "r2")]
    await asyncio.gather(*(r.refresh_streams() for r in relays))
    await asyncio.gather(*(r.drain() for r in relays))
    assert receiver.received().keys() == expected.keys()
    assert sum(r.delivered for r in relays) == len(receiver.deliveries) == len(expected)
    assert in_commit_order(receiver)
    for r in relays:
        await r.target.close()


async def test_a_batch_slower_than_the_claim_idle_time_stays_with_its_relay(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    """A batch that takes longer than the claim idle time: its relay keeps the entries it
    still holds from looking idle, so a second relay polling meanwhile takes none of them."""
    await orders.confirmed("sa", 12)
    quick = settings.replace(finalizer_claim_idle_ms=600)
    slow, other = (make_relay(redis, scripts, quick, receiver, name=n) for n in ("slow", "other"))
    receiver.hang_s = 0.1  # the batch takes about 1.2 s, twice the claim idle time
    batch = asyncio.create_task(slow.run_once())
    await until(lambda: receiver.requests >= 1)  # the slow relay holds the batch
    while not batch.done():
        await other.run_once()
        await asyncio.sleep(0.05)
    assert await batch == 12
    assert slow.delivered == 12 and other.delivered == 0
    assert len(receiver.deliveries) == 12 and len(receiver.received()) == 12
    for r in (slow, other):
        await r.target.close()


@BOTH_BACKENDS
async def test_a_relay_killed_mid_batch_is_finished_by_another(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 5)
    expected = await event_ids(redis)
    quick = settings.replace(finalizer_claim_idle_ms=1000)
    first = make_relay(redis, scripts, quick, receiver, name="doomed")
    receiver.hang_s = 0.2
    task = asyncio.create_task(first.run_once())
    await until(lambda: receiver.requests >= 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await first.target.close()
    receiver.hang_s = 0.0
    assert await pending(redis, set(expected.values()), first.group) >= 3
    second = make_relay(redis, scripts, quick, receiver, name="heir")
    assert await second.run_once() == 0  # the dead relay's entries are not idle yet
    await asyncio.sleep(1.0)
    await second.drain()
    assert receiver.received().keys() == expected.keys()
    assert await pending(redis, set(expected.values()), second.group) == 0
    assert in_commit_order(receiver)
    await second.target.close()


@BOTH_BACKENDS
async def test_a_sku_created_while_the_relay_runs_is_picked_up(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("sa", 2)
    relay = make_relay(redis, scripts, settings, receiver)
    task = asyncio.create_task(relay.run())
    await until(lambda: len(receiver.received()) == 2)
    await orders.confirmed("late", 3)
    expected = await event_ids(redis)
    await until(lambda: receiver.received().keys() == expected.keys())
    assert any(i.startswith("late/0/") for i in expected)
    relay.stop()
    await task


@BOTH_BACKENDS
async def test_a_bucketed_sku_delivers_from_every_bucket_stream(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, orders: Orders, receiver: Receiver
) -> None:
    await orders.confirmed("hot", 24, buckets=3)
    expected = await event_ids(redis)
    assert len(expected) == 24
    assert {i.split("/")[1] for i in expected} == {"0", "1", "2"}
    relay = make_relay(redis, scripts, settings, receiver)
    await relay.drain()
    assert receiver.received().keys() == expected.keys()
    assert len(relay.streams) == 3 and in_commit_order(receiver)
    await relay.target.close()
