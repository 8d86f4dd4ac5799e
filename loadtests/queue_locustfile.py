"""Locust shoppers in a QUEUE_ONLY line (issue #16): each orders one unit of the hot SKU, then
reads the order back only as the answers say (`Retry-After`) until a finalizer decides it, and
then comes back as another shopper.

Answers are judged as in `locustfile.py` (whose `Client` and spike shape this reuses), and more:
a queued `202` must carry `position`, a `QUEUED` order's `GET` must carry `queue` with
`Retry-After` equal to `poll_after_s`, and one order's positions must never rise. Every 202 goes
to `FLASHGATE_LT_ACCEPTED` (checked by the runner like the spike's); every order seen decided
adds one line to `FLASHGATE_LT_LINE`: its first position, the reads it took, the first ETA it was
told and when, and when it was decided (from its history). `python -m loadtests.run --scenario
queue` starts everything and reports poll volume and ETA error from these lines.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import gevent
from locust import constant, task

from loadtests.client import settle
from loadtests.locustfile import (  # SpikeShape: this file's load shape too
    CFG,
    Client,
    Recorder,
    SpikeShape,  # noqa: F401
    json_object,
    new_key,
)

LINE = Recorder(os.environ.get("FLASHGATE_LT_LINE") or "line.jsonl")
FIRST_READ_S = 1.0  # after the 202, before the first read (docs/api/shoppers.md)
MAX_READS = 1000


class LineShopper(Client):
    wait_time = constant(0)

    @task
    def queue_up(self) -> None:
        self.user_id = f"q-{uuid.uuid4().hex[:16]}"  # a new shopper each time: limit 1 each
        key = new_key()
        answer = self.create_until_served(CFG.hot_sku, key, label="line")
        view = json_object(answer.raw) if answer.status == 202 else None
        if view is None or view.get("status") != "QUEUED":
            return  # refused, or the mode was not QUEUE_ONLY: not in line
        self.wait_in_line(view, time.time())

    def wait_in_line(self, view: dict[str, Any], queued_at: float) -> None:
        order_id = str(view["order_id"])
        positions = [int(view.get("position") or 0)]
        first_eta: tuple[float, float] | None = None  # (when told, eta_s)
        wait, reads = FIRST_READ_S, 0
        while reads < MAX_READS:
            gevent.sleep(wait)
            reads += 1
            with self.client.get(
                f"/api/v1/order/{order_id}", name="GET /order/:id", catch_response=True
            ) as resp:
                got, problem = read_place(resp.status_code, resp.content, resp.headers)
                status = str(got.get("status", resp.status_code))
                resp.request_meta["name"] = f"GET /order/:id line [{resp.status_code} {status}]"
                place = got.get("queue")
                if place is not None and place["position"] > positions[-1] > 0:
                    problem = f"position rose from {positions[-1]} to {place['position']}"
                settle(resp, problem)
            if problem or resp.status_code not in (200, 503):
                return
            wait = float(got.get("retry_after") or 1)
            if place is not None:
                positions.append(place["position"])
                if first_eta is None and place["eta_s"] is not None:
                    first_eta = (time.time(), float(place["eta_s"]))
            elif resp.status_code == 200:
                LINE.write(line_record(order_id, got, positions, reads, queued_at, first_eta))
                return


def read_place(status: int, raw: bytes | None, headers: Any) -> tuple[dict[str, Any], str | None]:
    """(the order view with `retry_after`, problem) of one read of a queued order."""
    retry = str((headers or {}).get("Retry-After") or "")
    if status == 503:
        return {"retry_after": int(retry) if retry.isdigit() else 1}, None
    view = json_object(raw)
    if status != 200 or view is None:
        return {}, f"{status} {(raw or b'')[:120]!r}"
    place = view.get("queue")
    if view.get("status") == "QUEUED":
        if not isinstance(place, dict) or set(place) != {"position", "eta_s", "poll_after_s"}:
            return view, f"QUEUED without its queue: {place!r}"
        if retry != str(place["poll_after_s"]) or place["poll_after_s"] < 1:
            return view, f"Retry-After {retry!r} != poll_after_s {place['poll_after_s']}"
        return {**view, "retry_after": place["poll_after_s"]}, None
    if place is not None or retry:
        return view, f"{view.get('status')} with a queue or Retry-After"
    return view, None


def line_record(
    order_id: str,
    view: dict[str, Any],
    positions: list[int],
    reads: int,
    queued_at: float,
    first_eta: tuple[float, float] | None,
) -> dict[str, Any]:
    """One decided order's line of `FLASHGATE_LT_LINE` (times in epoch seconds)."""
    history = view.get("history") or []
    left = next((h for h in history if h.get("from") == "QUEUED"), None)
    return {
        "order_id": order_id,
        "status": view.get("status"),
        "first_position": positions[0],
        "positions": len(positions),
        "reads": reads,
        "queued_at": queued_at,
        "decided_at": left["at"] / 1000 if left else None,
        "eta_told_at": first_eta[0] if first_eta else None,
        "eta_s": first_eta[1] if first_eta else None,
    }
