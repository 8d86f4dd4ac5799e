"""Token bucket on an injected clock, local and shared through a file; the shared budget across
spawned processes."""

from __future__ import annotations

import math
import multiprocessing
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.intake.limiter import TokenBucket
from tests.support.state import Clock

Make = Callable[..., TokenBucket]


@pytest.fixture(params=["local", "shared"])
def make(request: pytest.FixtureRequest, clock: Clock, tmp_path: Path) -> Iterator[Make]:
    """Buckets on the fake clock: in a local buffer, or in a file under tmp_path."""
    built: list[TokenBucket] = []

    def factory(rate: float, burst: int) -> TokenBucket:
        path = tmp_path / "bucket" if request.param == "shared" else None
        bucket = TokenBucket(rate, burst, clock=clock, path=path)
        built.append(bucket)
        return bucket

    yield factory
    for bucket in built:
        bucket.close()


def drain(bucket: TokenBucket) -> int:
    """Take until refused; return how many were allowed."""
    allowed = 0
    while bucket.take() == 0.0:
        allowed += 1
    return allowed


def test_starts_full(make: Make) -> None:
    bucket = make(1.0, 5)
    assert bucket.tokens == 5
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() > 0.0


def test_retry_after_is_time_to_one_token(make: Make, clock: Clock) -> None:
    bucket = make(4.0, 1)
    assert bucket.take() == 0.0
    assert bucket.take() == 1 / 4  # empty: a whole token at 4/s
    clock.now += 0.125  # half a token
    assert bucket.tokens == 0.5
    assert bucket.take() == (1 - 0.5) / 4
    clock.now += 0.125
    assert bucket.take() == 0.0


def test_refill_over_time(make: Make, clock: Clock) -> None:
    bucket = make(1.0, 3)
    assert drain(bucket) == 3
    clock.now += 2.0
    assert bucket.tokens == 2.0
    assert drain(bucket) == 2


def test_capped_at_burst_after_long_idle(make: Make, clock: Clock) -> None:
    bucket = make(10.0, 3)
    assert drain(bucket) == 3
    clock.now += 1e6
    assert bucket.tokens == 3
    assert drain(bucket) == 3


def test_clock_going_backwards_gives_no_tokens(make: Make, clock: Clock) -> None:
    bucket = make(1.0, 2)
    assert drain(bucket) == 2
    clock.now -= 100.0
    assert bucket.tokens == 0.0
    assert bucket.take() == 1.0  # not negative, not inflated
    clock.now += 100.0  # back where it was: that time was already counted
    assert bucket.take() == 1.0
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_fractional_rate(make: Make, clock: Clock) -> None:
    bucket = make(0.25, 1)
    assert bucket.take() == 0.0
    assert bucket.take() == 4.0
    clock.now += 2.0
    assert bucket.take() == 2.0
    clock.now += 2.0
    assert bucket.take() == 0.0
    assert bucket.take() == 4.0


def test_tokens_does_not_take(make: Make, clock: Clock) -> None:
    bucket = make(1.0, 2)
    assert [bucket.tokens for _ in range(3)] == [2.0] * 3
    assert bucket.take() == 0.0
    assert bucket.tokens == 1.0
    clock.now += 0.5
    assert bucket.tokens == 1.5
    assert bucket.take() == 0.0
    assert bucket.tokens == 0.5


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.nan, 1), (math.inf, 1), (1.0, 0)]
)
def test_rejects_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_two_buckets_on_one_path_share_state(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "bucket"
    with (
        TokenBucket(1.0, 3, clock=clock, path=path) as a,
        TokenBucket(1.0, 3, clock=clock, path=path) as b,
    ):
        assert a.take() == 0.0
        assert b.take() == 0.0
        assert a.take() == 0.0
        assert b.take() == 1.0
        assert a.take() == 1.0
        clock.now += 1.0
        assert a.tokens == b.tokens == 1.0
        assert b.take() == 0.0
        assert a.take() == 1.0


def test_opening_a_used_file_keeps_its_state(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "bucket"
    with TokenBucket(1.0, 3, clock=clock, path=path) as first:
        assert drain(first) == 3
        with TokenBucket(1.0, 3, clock=clock, path=path) as second:
            assert second.tokens == 0.0  # not reset to full while in use
    with TokenBucket(1.0, 3, clock=clock, path=path) as again:
        assert again.tokens == 0.0
    assert path.stat().st_size == 16


@pytest.mark.parametrize("content", [b"", b"\x01" * 5, b"\xff" * 15])
def test_short_file_is_initialised_full(clock: Clock, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bucket"
    path.write_bytes(content)
    with TokenBucket(1.0, 3, clock=clock, path=path) as bucket:
        assert path.stat().st_size == 16
        assert drain(bucket) == 3


def test_file_from_before_a_reboot_is_not_starved(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "bucket"
    path.write_bytes(struct.pack("=dd", 1.0, 5e6))  # last refill far after this clock's now
    with TokenBucket(1.0, 3, clock=clock, path=path) as bucket:
        assert bucket.tokens == 1.0  # kept, not refilled to burst
        clock.now += 1.0
        assert drain(bucket) == 2


def test_closed_bucket_refuses_to_take(tmp_path: Path) -> None:
    bucket = TokenBucket(1.0, 1, path=tmp_path / "bucket")
    bucket.close()
    bucket.close()
    with pytest.raises(ValueError):
        bucket.take()


def _take_many(path: str, burst: int, n: int, barrier: Any, results: Any) -> None:
    """In a spawned process: open the shared bucket, take n times, report the allowed count."""
    barrier.wait(30)
    with TokenBucket(0.001, burst, path=path) as bucket:
        allowed = sum(bucket.take() == 0.0 for _ in range(n))
    results.put((os.getpid(), allowed))


def run_spawned(path: Path, burst: int, n: int, procs: int = 4) -> dict[int, int]:
    """Start `procs` spawned processes together, each taking n times; their allowed counts."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_take_many, args=(str(path), burst, n, barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        counts = dict(results.get(timeout=45) for _ in workers)
    finally:
        for w in workers:
            w.join(10)
        results.close()
        results.join_thread()
    assert [w.exitcode for w in workers] == [0] * procs
    assert len(counts) == procs  # distinct processes
    return counts


def test_processes_share_one_budget(tmp_path: Path) -> None:
    counts = run_spawned(tmp_path / "bucket", burst=1000, n=600)
    assert sum(counts.values()) == 1000  # one budget: 4 x 600 if each had its own


def test_concurrent_takes_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "bucket"
    with TokenBucket(0.001, 1_000_000, path=path) as bucket:  # file initialised before the race
        counts = run_spawned(path, burst=1_000_000, n=20_000)
        assert sum(counts.values()) == 80_000
        # every take was counted once: an unlocked read-modify-write would leave more behind
        assert 920_000 <= bucket.tokens < 920_000 + 1


def test_configure_keeps_the_tokens_and_caps_them_by_a_lower_burst(
    make: Make, clock: Clock
) -> None:
    bucket = make(1.0, 10)
    assert [bucket.take() for _ in range(4)] == [0.0] * 4  # 6 left
    bucket.configure(100.0, 10)
    assert bucket.tokens == 6.0  # a new rate does not refill what time did not
    clock.now += 0.02  # 2 tokens at the new rate
    assert bucket.tokens == pytest.approx(8.0)
    bucket.configure(100.0, 3)
    assert drain(bucket) == 3  # capped by the lower burst, not emptied
    bucket.configure(0.5, 3)
    assert bucket.take() == pytest.approx(2.0)  # a token in 2 s at the new rate
    with pytest.raises(ValueError):
        bucket.configure(0, 3)
    with pytest.raises(ValueError):
        bucket.configure(1.0, 0)
