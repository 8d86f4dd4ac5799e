"""Locust shoppers at a fair start (issue #16): the hot SKU has a pre-queue window
(`prequeue_s`) and a start a few seconds after the run begins. Each shopper orders one unit,
then reads the order back only as the answers say: a pre-queued order (`"position": null`,
`opens_at`) at its `opens_at` (a second after the 202 at least), then every `Retry-After`
until it is decided; then it comes back as another shopper, so orders arrive before the start
and after it. Works in QUEUE_ONLY and in NORMAL (after the draw, NORMAL holds at once: such an
order is decided when it is answered).

Answers are judged as in `queue_locustfile.py` (a `QUEUED` order's `GET` carries `queue` with
`Retry-After` equal to `poll_after_s`, one order's positions never rise) and more: a pre-queued
`202` has `position: null` and an `opens_at` in the future, an order after the start has no
`opens_at`. Every 202 goes to `FLASHGATE_LT_ACCEPTED`; every order seen decided adds one line to
`FLASHGATE_LT_LINE` (as the queue scenario's, with `prequeued`). `python -m loadtests.run
--scenario prequeue` starts everything, checks the draw's fairness and reports.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import gevent
from locust import between, task

from loadtests.client import settle
from loadtests.locustfile import (  # SpikeShape: this file's load shape too
    CFG,
    Client,
    Recorder,
    SpikeShape,  # noqa: F401
    json_object,
    new_key,
)
from loadtests.queue_locustfile import FIRST_READ_S, MAX_READS, line_record, read_place

LINE = Recorder(os.environ.get("FLASHGATE_LT_LINE") or "line.jsonl")


class EarlyShopper(Client):
    wait_time = between(CFG.think_s / 10, CFG.think_s)  # then the next shopper comes

    @task
    def queue_up(self) -> None:
        self.user_id = f"e-{uuid.uuid4().hex[:16]}"  # a new shopper each time: limit 1 each
        key = new_key()
        answer = self.create_until_served(CFG.hot_sku, key, label="prequeue")
        view = json_object(answer.raw) if answer.status == 202 else None
        if view is None:
            return  # refused (sold out after the draw, in NORMAL)
        problem = prequeue_problem(view)
        if problem:  # a Locust exception: the run fails
            raise AssertionError(f"202 of order {view.get('order_id')}: {problem}")
        now = time.time()
        if view.get("status") == "HELD":  # NORMAL after the draw: decided as answered
            LINE.write({**line_record(str(view["order_id"]), {}, [0], 0, now, None),
                        "status": "HELD", "decided_at": now, "prequeued": False})  # fmt: skip
            return
        self.wait_in_line(view, now)

    def wait_in_line(self, view: dict[str, Any], queued_at: float) -> None:
        order_id = str(view["order_id"])
        opens_at = view.get("opens_at")
        prequeued = view.get("position") is None
        positions = [int(view.get("position") or 0)]
        first_eta: tuple[float, float] | None = None  # (when told, eta_s)
        wait = FIRST_READ_S
        if isinstance(opens_at, int):  # pre-queued: nothing to learn before the start
            wait = max(wait, opens_at - time.time())
        reads = 0
        while reads < MAX_READS:
            gevent.sleep(wait)
            reads += 1
            with self.client.get(
                f"/api/v1/order/{order_id}", name="GET /order/:id", catch_response=True
            ) as resp:
                got, problem = read_place(resp.status_code, resp.content, resp.headers)
                status = str(got.get("status", resp.status_code))
                early = "prequeued" if prequeued else "after start"
                resp.request_meta["name"] = f"GET /order/:id {early} [{resp.status_code} {status}]"
                place = got.get("queue")
                now = place.get("position") if place is not None else None
                if now is not None and 0 < positions[-1] < now:
                    problem = f"position rose from {positions[-1]} to {now}"
                settle(resp, problem)
            if problem or resp.status_code not in (200, 503):
                return
            wait = float(got.get("retry_after") or 1)
            if place is not None:
                if now is not None:
                    positions.append(now)
                if first_eta is None and place["eta_s"] is not None:
                    first_eta = (time.time(), float(place["eta_s"]))
            elif resp.status_code == 200:
                record = line_record(order_id, got, positions, reads, queued_at, first_eta)
                LINE.write({**record, "prequeued": prequeued, "opens_at": opens_at})
                return


def prequeue_problem(view: dict[str, Any]) -> str | None:
    """A 202's fair-start fields: a QUEUED order's `position` is null exactly when it has an
    `opens_at` (it is pre-queued); a HELD one has neither."""
    opens_at, position = view.get("opens_at"), view.get("position")
    if view.get("status") == "HELD":
        return None if opens_at is None and position is None else "HELD with a place"
    if (opens_at is None) == (position is None):
        return f"position {position!r} with opens_at {opens_at!r}"
    return None
