"""The shoppers of the spike: one-tap buyers, impatient tappers, retriers and, with
`FLASHGATE_LT_SCALPERS` > 0, the scalpers; and their create latencies, honest apart from
scalpers, for the runner."""

from __future__ import annotations

import json
import math
import os
import random
import time
import uuid
from typing import Any

import gevent
from locust import between, constant, events, task

from loadtests.client import CFG, Answer, Client, new_key


def pick_sku(hot_share: float) -> str:
    return CFG.hot_sku if random.random() < hot_share else random.choice(CFG.skus)


class Shopper(Client):
    """Taps "buy" once per attempt, looks at the orders, pays a share of them."""

    weight = 10
    wait_time = between(CFG.think_s / 10, CFG.think_s)

    @task(5)
    def buy_hot(self) -> None:
        answer = self.create(CFG.hot_sku, new_key(), label="hot")
        self.follow_up(answer, CFG.hot_sku)

    @task(3)
    def buy_ordinary(self) -> None:
        sku = random.choice(CFG.skus)
        answer = self.create(sku, new_key(), label="sku", quantity=random.choice((1, 1, 1, 2)))
        self.follow_up(answer, sku)

    @task(4)
    def look(self) -> None:
        if self.orders:
            self.poll(*random.choice(self.orders))


class ImpatientShopper(Client):
    """Taps 4 times within 2 s with one idempotency key: a double tap (the first two in flight
    together), then two more. Once one tap has got a 202, every tap sent after it must get
    that answer again, byte for byte, marked replayed (or an overload refusal); all 202s of
    the key are the same order and at most one of them is not a replay."""

    weight = 4
    wait_time = between(CFG.think_s, 2 * CFG.think_s)

    @task
    def tap_four_times(self) -> None:
        sku = pick_sku(0.7)
        key = new_key()
        start = time.monotonic()
        offsets = (0.0, 0.02, random.uniform(0.3, 0.9), random.uniform(1.0, 1.9))
        answers: list[Answer] = []
        taps: list[gevent.Greenlet] = []
        try:
            for offset in offsets:
                gevent.sleep(max(0.0, start + offset - time.monotonic()))
                first = next((a.raw for a in answers if a.status == 202), None)
                taps.append(gevent.spawn(self._tap, sku, key, first, answers))
            gevent.joinall(taps)
        finally:  # a stopped user takes its taps with it (their stats would come too late)
            gevent.killall(taps)
        accepted = [a for a in answers if a.status == 202]
        problem = None
        if len({a.raw for a in accepted}) > 1:
            problem = "one key, several different 202 answers"
        elif sum(a.code != "replay" for a in accepted) > 1:
            problem = "one key, more than one fresh (not replayed) 202"
        if problem:
            self.environment.events.request.fire(
                request_type="CHECK",
                name="impatient taps: one order per key",
                response_time=0,
                response_length=0,
                exception=AssertionError(problem),
                context={},
            )
        fresh = next((a for a in accepted if a.code != "replay"), None)
        if fresh is not None:
            self.follow_up(fresh, sku)

    def _tap(self, sku: str, key: str, first: bytes | None, answers: list[Answer]) -> None:
        answers.append(self.create(sku, key, label="tap", replay_of=first))


class RetryingShopper(Client):
    """Retries refusals and lost answers with a NEW key each time (a badly written client):
    only the per-user limit stands between it and a second order."""

    weight = 3
    wait_time = between(CFG.think_s, 2 * CFG.think_s)

    @task
    def buy_until_answered(self) -> None:
        sku = pick_sku(0.7)
        for _ in range(6):
            answer = self.create(sku, new_key(), label="retry")
            if answer.status == 202:
                self.follow_up(answer, sku)
                return
            if answer.status == 409 and answer.code != "idempotency_key_in_use":
                return  # sold out or at the limit: give up
            pause = min(answer.retry_after_s or 0.5, 1.5)
            gevent.sleep(pause * random.uniform(0.2, 1.0))


class KeyScalper(Client):
    """One user, as fast as it can, a new key each time, on the hot SKU and the others: its
    own bucket (`user_qps`) refuses it before Redis; the per-user limit stops the rest."""

    abstract = CFG.scalpers == 0
    fixed_count = CFG.scalpers
    wait_time = constant(0)

    @task
    def grab(self) -> None:
        self.create(pick_sku(0.5), new_key(), label="scalper-keys")


class AddressScalper(Client):
    """One address (behind the trusted proxy), a new user id for every order: the address's
    bucket (`client_qps`) refuses it whatever user it names."""

    abstract = CFG.scalpers == 0
    fixed_count = CFG.scalpers
    wait_time = constant(0)

    @task
    def grab(self) -> None:
        self.user_id = f"s-{uuid.uuid4().hex[:16]}"
        self.create(pick_sku(0.5), new_key(), label="scalper-users")


class Latencies:
    """Create latencies in whole ms, honest shoppers apart from scalpers (`create scalper-*`),
    written when the process quits (one file per process: `<path>.<pid>`) for the runner."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[int, int]] = {"honest": {}, "scalper": {}}

    def request(self, name: str, response_time: float, **_: Any) -> None:
        if not name.startswith("create "):
            return
        group = self.groups["scalper" if name.startswith("create scalper") else "honest"]
        ms = math.ceil(response_time)
        group[ms] = group.get(ms, 0) + 1

    def write(self, **_: Any) -> None:
        if any(self.groups.values()):
            with open(f"{CFG.latency_path}.{os.getpid()}", "w", encoding="utf-8") as f:
                json.dump(self.groups, f)


LATENCIES = Latencies()
events.request.add_listener(LATENCIES.request)
events.quitting.add_listener(LATENCIES.write)
