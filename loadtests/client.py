"""The shared client of the Locust shoppers: their configuration (`FLASHGATE_LT_*`), the
record of accepted answers, the contract's answers and how one is judged, and `Client`, whose
create, poll and pay every shopper uses."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import gevent
from locust import FastHttpUser
from locust.contrib.fasthttp import ResponseContextManager

CREATE = "/api/v1/order/create"
PAY = "/api/v1/payment/confirm"
SWITCH = "/api/v1/order/switch"
STATUSES = {"QUEUED", "HELD", "CONFIRMED", "EXPIRED", "REJECTED", "PAID_AFTER_EXPIRY"}
OVERLOAD = {
    429: {"rate_limited", "client_rate_limited"},
    503: {"busy", "queue_full", "unavailable"},
}
# The refusals a well-behaved shopper may get: expected successes of a load test.
REFUSALS = {409: {"sold_out", "limit_exceeded", "idempotency_key_in_use"}, **OVERLOAD}
# What a tap may get instead of the replay of the 202 its key already got: a refusal that comes
# before the idempotency check (token bucket, breaker, Redis down) or "still in progress".
REPLAY_REFUSALS = {409: {"idempotency_key_in_use"}, **OVERLOAD}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Config:
    """Everything the shoppers and the shape read from the environment (`FLASHGATE_LT_*`)."""

    hot_sku: str
    skus: tuple[str, ...]
    promotion: str
    admin_token: str
    payment_secret: str
    accepted_path: str
    users: int
    spawn_s: float
    hold_s: float
    tail_s: float
    tail_users: int
    pay_share: float
    switch_every_s: float
    queue_only_s: float
    think_s: float
    strict: bool
    scalpers: int  # of each kind; > 0: shoppers send their address in X-Forwarded-For
    latency_path: str  # create latencies of honest shoppers and scalpers (JSON, per process)

    @classmethod
    def from_env(cls) -> Config:
        users = int(_env("FLASHGATE_LT_USERS", "300"))
        return cls(
            hot_sku=_env("FLASHGATE_LT_HOT_SKU", "hot"),
            skus=tuple(_env("FLASHGATE_LT_SKUS", "std-1,std-2,std-3").split(",")),
            promotion=_env("FLASHGATE_LT_PROMOTION", "promo-load"),
            admin_token=_env("FLASHGATE_ADMIN_TOKEN", ""),
            payment_secret=_env("FLASHGATE_PAYMENT_SECRET", ""),
            accepted_path=_env("FLASHGATE_LT_ACCEPTED", "accepted.jsonl"),
            users=users,
            spawn_s=float(_env("FLASHGATE_LT_SPAWN_S", "2")),
            hold_s=float(_env("FLASHGATE_LT_HOLD_S", "30")),
            tail_s=float(_env("FLASHGATE_LT_TAIL_S", "10")),
            tail_users=int(_env("FLASHGATE_LT_TAIL_USERS", str(max(1, users // 10)))),
            pay_share=float(_env("FLASHGATE_LT_PAY_SHARE", "0.3")),
            switch_every_s=float(_env("FLASHGATE_LT_SWITCH_EVERY_S", "4")),
            queue_only_s=float(_env("FLASHGATE_LT_QUEUE_ONLY_S", "1.5")),
            think_s=float(_env("FLASHGATE_LT_THINK_S", "0.5")),
            strict=_env("FLASHGATE_LT_STRICT", "0") not in ("0", "false", "no", "off"),
            scalpers=int(_env("FLASHGATE_LT_SCALPERS", "0")),
            latency_path=_env("FLASHGATE_LT_LATENCY", "latency.json"),
        )


CFG = Config.from_env()


class Recorder:
    """Appends one JSON line per accepted answer. The file is opened with O_APPEND in each
    process and every line is one write(), so several Locust processes share it safely."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._pid = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        if os.write(self._fd, line) != len(line):
            raise OSError(f"short write to {self.path}")


RECORDER = Recorder(CFG.accepted_path)


def new_key() -> str:
    return str(uuid.uuid4())


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """The JSON object in `raw`, or None when it is not one."""
    try:
        value = json.loads(raw or b"")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def history_problem(view: dict[str, Any]) -> str | None:
    """An order view's history starts with its creation and ends at its status."""
    history = view.get("history")
    if not isinstance(history, list) or not history or not isinstance(history[-1], dict):
        return f"history {history!r}"
    if not isinstance(history[0], dict) or history[0].get("from") is not None:
        return f"history does not start with the creation: {history!r}"
    if history[-1].get("to") != view.get("status"):
        return f"status {view.get('status')} but history ends at {history[-1].get('to')}"
    return None


def read_error(resp: ResponseContextManager) -> tuple[str, str | None]:
    """(code, problem) of a non-2xx answer: the contract's `{"error", "message"}` body, and
    `Retry-After` of at least 1 s on every 429/503. problem is None when all is as written."""
    body = json_object(resp.content)
    if body is None:
        return "not_json", f"{resp.status_code} body is not a JSON object"
    code, message = body.get("error"), body.get("message")
    if not isinstance(code, str) or not isinstance(message, str) or not message:
        return "no_error_code", f"{resp.status_code} body lacks the error/message fields"
    retry_after = str(resp.headers.get("Retry-After") or "")
    if resp.status_code in (429, 503) and not (retry_after.isdigit() and int(retry_after) >= 1):
        return code, f"{resp.status_code} {code} without a valid Retry-After"
    return code, None


def settle(resp: ResponseContextManager, problem: str | None, name: str | None = None) -> None:
    """Tell Locust how the request went: failed with `problem`, or a success; listed under
    `name` (the answer's kind) when given."""
    if name is not None:
        resp.request_meta["name"] = name
    if problem:
        resp.failure(problem)
    else:
        resp.success()


def judge_error(
    resp: ResponseContextManager, expected: dict[int, set[str]]
) -> tuple[str, str | None]:
    """(code, problem): the answer must be one of `expected` {status: codes} with its body."""
    if resp.status_code == 0:
        return "no_answer", f"no answer: {getattr(resp, 'error', None)!r}"
    if resp.status_code >= 500 and resp.status_code != 503:
        return "server_error", f"{resp.status_code}: {(resp.content or b'')[:200]!r}"
    code, problem = read_error(resp)
    if problem is None and code not in expected.get(resp.status_code, set()):
        problem = f"unexpected {resp.status_code} {code}"
    return code, problem


@dataclass
class Answer:
    status: int
    code: str  # error code; for a 202 the order status, or "replay"
    raw: bytes = b""
    order_id: str = ""
    retry_after_s: float = 0.0


class Client(FastHttpUser):
    """Shared calls: create an order, poll it, pay it, each judged against the contract."""

    abstract = True
    network_timeout = 20.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        self.user_id = f"u-{uuid.uuid4().hex[:16]}"
        self.orders: list[tuple[str, str]] = []  # (order_id, sku_id) of fresh 202s
        # behind the trusted proxy (scalper runs): each shopper its own address (198.18/15)
        self.address = (
            f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        )

    def create(
        self,
        sku: str,
        key: str,
        *,
        label: str,
        quantity: int = 1,
        replay_of: bytes | None = None,
        expected: dict[int, set[str]] | None = None,
    ) -> Answer:
        """POST one order. `replay_of`: the 202 this key already got (the answer must be that,
        byte for byte, marked replayed; overload refusals are allowed, nothing else).
        `expected`: the only answers allowed (instead of a 202 or the shopper's refusals)."""
        body = {
            "user_id": self.user_id,
            "sku_id": sku,
            "quantity": quantity,
            "promotion_id": CFG.promotion,
        }
        headers = {"X-Idempotency-Key": key}
        if CFG.scalpers:
            headers["X-Forwarded-For"] = self.address
        with self.client.post(
            CREATE, json=body, headers=headers, name=CREATE, catch_response=True
        ) as resp:
            if resp.status_code == 202:
                answer, problem = self._accepted(resp, body, key, replay_of)
                if problem is None and expected is not None and 202 not in expected:
                    problem = f"202 {answer.raw[:120]!r} where {sorted(expected)} was expected"
            else:
                if expected is not None:
                    allowed = expected
                elif replay_of is not None:
                    allowed, label = REPLAY_REFUSALS, label + " replay"
                else:
                    allowed = REFUSALS
                code, problem = judge_error(resp, allowed)
                retry = resp.headers.get("Retry-After") if resp.headers else None
                retry_s = float(retry) if retry and retry.isdigit() else 0.0
                answer = Answer(resp.status_code, code, retry_after_s=retry_s)
            settle(resp, problem, f"create {label} [{answer.status} {answer.code}]")
        return answer

    def create_until_served(self, sku: str, key: str, *, label: str) -> Answer:
        """`create`, sent again with the same key after each overload answer (429, 503), as
        its Retry-After says (at least 1 s): a shopper in line who does as told."""
        answer = self.create(sku, key, label=label)
        while answer.status in (429, 503):
            gevent.sleep(max(answer.retry_after_s, 1.0))
            answer = self.create(sku, key, label=label)
        return answer

    def _accepted(
        self,
        resp: ResponseContextManager,
        body: dict[str, Any],
        key: str,
        replay_of: bytes | None,
    ) -> tuple[Answer, str | None]:
        raw = resp.content or b""
        replayed = resp.headers.get("Idempotent-Replayed") == "true"
        view = json_object(raw)
        if view is None:
            return Answer(202, "not_json", raw), "202 body is not a JSON object"
        status, order_id = view.get("status"), view.get("order_id")
        answer = Answer(202, "replay" if replayed else str(status), raw, str(order_id or ""))
        if answer.order_id:  # record first: whatever else is wrong, the shopper holds this id
            RECORDER.write(
                {
                    "kind": "order",
                    "order_id": answer.order_id,
                    "user_id": body["user_id"],
                    "key": key,
                    "sku_id": body["sku_id"],
                    "quantity": body["quantity"],
                    "status": status,
                    "replayed": replayed,
                    "at": time.time(),
                }
            )
        if status not in ("HELD", "QUEUED") or not answer.order_id:
            return answer, f"202 without order_id or with status {status!r}"
        if view.get("sku_id") != body["sku_id"] or view.get("quantity") != body["quantity"]:
            return answer, f"202 for another order: {raw[:200]!r}"
        if status == "HELD" and not isinstance(view.get("hold_expires_at"), int):
            return answer, "202 HELD without hold_expires_at"
        if replay_of is not None and (raw != replay_of or not replayed):
            return answer, f"tap after a 202 got {raw[:120]!r} (replayed={replayed})"
        if not replayed:
            self.orders.append((answer.order_id, body["sku_id"]))
        return answer, None

    def poll(self, order_id: str, sku: str) -> str:
        """GET an order this shopper was accepted for: it must be there, and be its own."""
        with self.client.get(
            f"/api/v1/order/{order_id}", name="/order/:id", catch_response=True
        ) as resp:
            status, problem = "?", None
            if resp.status_code == 200:
                view = json_object(resp.content) or {}
                status = str(view.get("status"))
                if (view.get("order_id"), view.get("user_id"), view.get("sku_id")) != (
                    order_id,
                    self.user_id,
                    sku,
                ):
                    problem = f"not this shopper's order: {(resp.content or b'')[:200]!r}"
                elif status not in STATUSES:
                    problem = f"unknown order status {status}"
                else:
                    problem = history_problem(view)
            elif resp.status_code == 404:
                status, problem = "unknown_order", f"accepted order {order_id} not found"
            else:
                status, problem = judge_error(resp, {503: {"unavailable"}})
            settle(resp, problem, f"/order/:id [{resp.status_code} {status}]")
        return status

    def pay(self, order_id: str) -> None:
        """Signed payment confirmation; the provider sometimes delivers it twice."""
        payment_id = f"pay-{uuid.uuid4().hex}"
        body = json.dumps(
            {"order_id": order_id, "payment_id": payment_id}, separators=(",", ":")
        ).encode()
        signature = hmac.new(CFG.payment_secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-Signature": signature, "Content-Type": "application/json"}
        for attempt in range(2 if random.random() < 0.2 else 1):
            with self.client.post(PAY, data=body, headers=headers, catch_response=True) as resp:
                code, problem = "paid", None
                if resp.status_code == 202:
                    view = json_object(resp.content)
                    replayed = resp.headers.get("Idempotent-Replayed") == "true"
                    code = "paid again" if replayed else "paid"
                    if view != {"order_id": order_id, "payment_id": payment_id, "accepted": True}:
                        problem = f"payment answer {(resp.content or b'')[:200]!r}"
                    elif attempt and not replayed:
                        problem = "second delivery of a payment not marked replayed"
                    elif not attempt:
                        RECORDER.write(
                            {"kind": "payment", "order_id": order_id, "payment_id": payment_id}
                        )
                else:
                    code, problem = judge_error(resp, {503: {"unavailable"}})
                settle(resp, problem, f"/payment/confirm [{resp.status_code} {code}]")
            if resp.status_code != 202:
                return

    def follow_up(self, answer: Answer, sku: str) -> None:
        """After a fresh 202: look at the order, and a share of shoppers pays."""
        if answer.status != 202 or answer.code == "replay" or not answer.order_id:
            return
        self.poll(answer.order_id, sku)
        if random.random() < CFG.pay_share:
            self.pay(answer.order_id)
            self.poll(answer.order_id, sku)
