"""Every transition of the slow-call breaker, on an injected clock."""

from __future__ import annotations

import pytest

from gateway.intake.breaker import CircuitBreaker, State
from tests.support.state import Clock


@pytest.fixture
def transitions() -> list[tuple[State, State]]:
    return []


@pytest.fixture
def breaker(clock: Clock, transitions: list[tuple[State, State]]) -> CircuitBreaker:
    return CircuitBreaker(
        rt_ms=800,
        slow_ratio=0.5,
        min_calls=5,
        window_ms=1000,
        open_s=10,
        clock=clock,
        on_transition=lambda a, b: transitions.append((a, b)),
    )


def calls(b: CircuitBreaker, fast: int = 0, slow: int = 0, failed: int = 0) -> None:
    for _ in range(fast):
        assert b.allow()
        b.record(0.010)
    for _ in range(slow):
        assert b.allow()
        b.record(0.801)
    for _ in range(failed):
        assert b.allow()
        b.record(0.001, failed=True)


def test_stays_closed_below_min_calls(breaker: CircuitBreaker) -> None:
    calls(breaker, slow=4)
    assert breaker.state is State.CLOSED


def test_opens_when_slow_share_exceeds_ratio(breaker: CircuitBreaker) -> None:
    calls(breaker, fast=2, slow=2)
    assert breaker.state is State.CLOSED
    calls(breaker, slow=1)  # 3 of 5 slow: 0.6 > 0.5
    assert breaker.state is State.OPEN
    assert not breaker.allow()


def test_share_equal_to_ratio_does_not_open(breaker: CircuitBreaker) -> None:
    calls(breaker, fast=3, slow=3)
    assert breaker.state is State.CLOSED


def test_exactly_the_threshold_is_not_slow(breaker: CircuitBreaker) -> None:
    for _ in range(10):
        assert breaker.allow()
        breaker.record(0.800)
    assert breaker.state is State.CLOSED


def test_failures_count_as_slow(breaker: CircuitBreaker) -> None:
    calls(breaker, fast=2, failed=3)
    assert breaker.state is State.OPEN


def test_counts_reset_with_each_window(breaker: CircuitBreaker, clock: Clock) -> None:
    calls(breaker, fast=1, slow=3)
    clock.now += 1.0  # a new window: the three slow calls no longer count
    calls(breaker, fast=3, slow=2)
    assert breaker.state is State.CLOSED
    calls(breaker, slow=2)  # 4 of 7 slow in this window
    assert breaker.state is State.OPEN


def test_open_refuses_until_open_time_then_one_probe(
    breaker: CircuitBreaker, clock: Clock, transitions: list[tuple[State, State]]
) -> None:
    calls(breaker, slow=5)
    assert breaker.retry_after_s() == 10
    clock.now += 9.5
    assert not breaker.allow()
    assert breaker.retry_after_s() == 1
    clock.now += 0.5
    assert breaker.allow()  # the probe
    assert breaker.state is State.HALF_OPEN
    assert not breaker.allow()  # everyone else waits for it
    assert not breaker.allow()
    breaker.record(0.005)
    assert breaker.state is State.CLOSED
    assert breaker.allow()
    assert transitions == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


@pytest.mark.parametrize("probe", [{"elapsed_s": 0.9}, {"elapsed_s": 0.0, "failed": True}])
def test_slow_or_failed_probe_opens_again(
    breaker: CircuitBreaker, clock: Clock, probe: dict[str, float]
) -> None:
    calls(breaker, slow=5)
    clock.now += 10
    assert breaker.allow()
    breaker.record(**probe)  # type: ignore[arg-type]
    assert breaker.state is State.OPEN
    assert breaker.retry_after_s() == 10  # a full open interval from the probe's end
    clock.now += 10
    assert breaker.allow() and breaker.state is State.HALF_OPEN


def test_closing_starts_a_fresh_window(breaker: CircuitBreaker, clock: Clock) -> None:
    calls(breaker, fast=1, slow=4)  # 4 of 5 slow
    assert breaker.state is State.OPEN
    clock.now += 10
    calls(breaker, fast=1)  # probe closes it
    calls(breaker, fast=3, slow=1)
    assert breaker.state is State.CLOSED


def test_late_results_while_open_are_ignored(breaker: CircuitBreaker, clock: Clock) -> None:
    for _ in range(5):
        assert breaker.allow()
    for _ in range(5):
        breaker.record(1.0)
    assert breaker.state is State.OPEN
    breaker.record(0.001)  # a call that started before it opened
    assert breaker.state is State.OPEN


def test_ratio_one_opens_only_when_every_call_is_slow(clock: Clock) -> None:
    b = CircuitBreaker(slow_ratio=1.0, min_calls=3, clock=clock)
    calls(b, fast=1, slow=3)
    assert b.state is State.CLOSED
    clock.now += 1
    calls(b, slow=3)
    assert b.state is State.OPEN


def test_configure_keeps_the_state_and_applies_the_new_thresholds(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    calls(breaker, slow=5)
    assert breaker.state is State.OPEN
    opened = breaker.opened_at
    breaker.configure(rt_ms=50, slow_ratio=0.5, min_calls=5, window_ms=1000, open_s=2)
    assert breaker.state is State.OPEN and breaker.opened_at == opened  # still open
    clock.now += 2  # the new open time, not the old one
    assert breaker.allow()  # the probe
    breaker.record(0.01)
    assert breaker.state is State.CLOSED
    calls(breaker, fast=2)
    breaker.configure(rt_ms=50, slow_ratio=0.5, min_calls=3, window_ms=1000, open_s=2)
    breaker.record(0.06)  # slow under the new threshold (it was fast under 800 ms)
    breaker.record(0.06)
    assert breaker.state is State.CLOSED  # 2 slow of 4: the window kept its 2 fast calls
    breaker.record(0.06)
    assert breaker.state is State.OPEN  # 3 of 5
