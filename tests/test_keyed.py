"""Per-user and per-client token buckets (`gateway/intake/keyed.py`) on an injected clock,
local and shared through a file: limits, refusals that take nothing, live changes, bounded
memory under a flood of fresh keys, one budget for the processes of an instance."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.intake.keyed import (
    CLIENT,
    SETS,
    USER,
    WAYS,
    KeyedBuckets,
    capacity,
    subscriber,
)
from tests.support.state import Clock

Make = Callable[..., KeyedBuckets]


@pytest.fixture(params=["local", "shared"])
def make(request: pytest.FixtureRequest, clock: Clock, tmp_path: Path) -> Iterator[Make]:
    built: list[KeyedBuckets] = []

    def factory(
        user: tuple[float, int] = (0, 0), client: tuple[float, int] = (0, 0), **kw: Any
    ) -> KeyedBuckets:
        path = tmp_path / "clients" if request.param == "shared" else None
        table = KeyedBuckets(clock=clock, path=path, **kw)
        table.configure(*user, *client)
        built.append(table)
        return table

    yield factory
    for table in built:
        table.close()


def allowed(table: KeyedBuckets, user: str, client: str, n: int) -> int:
    return sum(table.take(user, client) == ("", 0.0) for _ in range(n))


def test_off_until_a_rate_is_set(make: Make) -> None:
    table = make()
    assert not table.on
    assert allowed(table, "u1", "10.0.0.1", 1000) == 1000
    table.configure(0, 5, 0, 5)  # a burst alone turns nothing on
    assert not table.on and allowed(table, "u1", "10.0.0.1", 100) == 100


def test_a_greedy_user_is_refused_and_the_others_are_not(make: Make, clock: Clock) -> None:
    table = make(user=(2.0, 3))
    assert allowed(table, "greedy", "", 10) == 3
    limit, wait = table.take("greedy", "")
    assert limit == USER and wait == pytest.approx(0.5)  # a token at 2/s
    assert allowed(table, "honest", "", 3) == 3
    clock.now += 0.5
    assert allowed(table, "greedy", "", 5) == 1


def test_a_greedy_address_is_refused_whatever_user_it_names(make: Make) -> None:
    table = make(client=(1.0, 2))
    assert sum(table.take(f"u{i}", "10.0.0.9") == ("", 0.0) for i in range(10)) == 2
    assert table.take("u99", "10.0.0.9")[0] == CLIENT
    assert allowed(table, "u1", "10.0.0.10", 2) == 2
    assert allowed(table, "u1", "", 50) == 50  # an unknown address is not limited


def test_an_ipv6_client_counts_by_its_64(make: Make) -> None:
    """A subscriber gets a /64: changing the low bits does not buy a fresh budget."""
    table = make(client=(0.001, 3))
    got = [table.take("u", f"2001:db8:1:2::{i:x}") for i in range(5)]
    assert [limit for limit, _ in got] == ["", "", "", CLIENT, CLIENT]
    assert table.take("u", "2001:db8:1:3::1") == ("", 0.0)  # the next /64
    assert subscriber("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert subscriber("10.0.0.1") == "10.0.0.1" and subscriber("bogus:") == "bogus:"


def test_a_refusal_takes_from_neither_bucket(make: Make) -> None:
    table = make(user=(0.001, 2), client=(0.001, 6))
    assert allowed(table, "u1", "10.0.0.1", 2) == 2
    assert table.take("u1", "10.0.0.1")[0] == USER  # the address's tokens are left alone
    assert allowed(table, "u2", "10.0.0.1", 2) == 2
    assert allowed(table, "u3", "10.0.0.1", 2) == 2  # 6 - 2 - 2: nothing was taken for u1
    assert table.take("u4", "10.0.0.1")[0] == CLIENT
    assert allowed(table, "u4", "10.0.0.2", 2) == 2  # u4's bucket was not spent by it


def test_a_burst_of_zero_is_one_second_of_the_rate() -> None:
    assert capacity(2.5, 0) == 3.0 and capacity(0.2, 0) == 1.0 and capacity(5, 7) == 7.0


def test_new_rules_keep_the_tokens(make: Make, clock: Clock) -> None:
    table = make(user=(1.0, 10))
    assert allowed(table, "u1", "", 7) == 7  # 3 left
    table.configure(1.0, 2, 0, 0)
    assert allowed(table, "u1", "", 5) == 2  # capped by the lower burst
    table.configure(100.0, 10, 0, 0)
    clock.now += 0.0501
    assert allowed(table, "u1", "", 20) == 5  # refilled at the new rate, not reset to full
    table.configure(0, 0, 0, 0)
    assert allowed(table, "u1", "", 20) == 20


def test_a_flood_of_fresh_keys_never_frees_a_drained_one(make: Make) -> None:
    """A small table, 40 times more keys than entries: memory stays what it was, and the
    greedy user's empty bucket is never the one evicted (fresher, fuller ones go first)."""
    table = make(user=(0.001, 5), sets=64)
    size = len(table._buf)
    assert allowed(table, "greedy", "", 10) == 5
    for i in range(64 * WAYS * 40):
        assert table.take(f"fresh-{i}", "") == ("", 0.0)
        if i % 997 == 0:
            assert table.take("greedy", "")[0] == USER, i
    assert table.take("greedy", "")[0] == USER
    assert len(table._buf) == size == 48 + 2 * 64 * WAYS * 24


def test_the_default_table_size_is_what_the_docs_say() -> None:
    table = KeyedBuckets()
    try:
        assert len(table._buf) == 48 + 2 * SETS * WAYS * 24 == 3 * 2**20 + 48
    finally:
        table.close()


def test_a_table_from_before_a_reboot_starts_again(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "clients"
    clock.now = 5e6
    with_old = KeyedBuckets(clock=clock, path=path)
    with_old.configure(0.001, 2, 0, 0)
    assert allowed(with_old, "u1", "", 5) == 2
    with_old.close()
    clock.now = 1000.0  # the clock started again: the stored times are in its future
    table = KeyedBuckets(clock=clock, path=path)
    table.configure(0.001, 2, 0, 0)
    assert allowed(table, "u1", "", 5) == 2  # not stuck until the clock passes 5e6
    table.close()
    again = KeyedBuckets(clock=clock, path=path)  # the same boot: the state is kept
    again.configure(0.001, 2, 0, 0)
    assert allowed(again, "u1", "", 5) == 0
    again.close()


def _take_many(path: str, n: int, barrier: Any, results: Any) -> None:
    """In a spawned process: open the shared table, one user takes n times."""
    table = KeyedBuckets(path=path)
    table.configure(0.001, 500, 0, 0)
    barrier.wait(30)
    got = sum(table.take("scalper", "") == ("", 0.0) for _ in range(n))
    table.close()
    results.put((os.getpid(), got))


def test_the_processes_of_an_instance_share_each_budget(tmp_path: Path) -> None:
    path = tmp_path / "clients"
    KeyedBuckets(path=path).close()  # made once, before the race
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_take_many, args=(str(path), 400, barrier, results)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    try:
        counts = dict(results.get(timeout=45) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
    assert [p.exitcode for p in procs] == [0, 0, 0] and len(counts) == 3
    assert sum(counts.values()) == 500  # one budget: 3 x 400 if each had its own
