"""Logs: one JSON object per line from every process of `serve`, the access log only when asked
for, with request and order ids, never a token."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from gateway.telemetry.logs import JsonFormatter
from tests.support.api import ADMIN_TOKEN
from tests.support.processes import Serve

pytestmark = pytest.mark.integration


def test_a_record_is_one_json_line_with_its_fields() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc = sys.exc_info()
    record = logging.LogRecord("flashgate", logging.WARNING, "x.py", 1, "hello %s", ("you",), exc)
    record.order_id = "abc.sku-1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "hello you"
    assert (out["level"], out["logger"], out["order_id"]) == ("warning", "flashgate", "abc.sku-1")
    assert out["ts"].endswith("Z") and "boom" in out["exc"]


def lines(log: Path) -> list[dict[str, object]]:
    text = log.read_text()
    parsed = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert parsed, "nothing logged"
    return parsed


def test_serve_logs_json_and_the_access_log_when_asked(tmp_path: Path) -> None:
    serve = Serve(tmp_path / "data", "--access-log")
    try:
        serve.put_hot(5, headers={"X-Request-Id": "req-put-1"})
        key = str(uuid.uuid4())
        order = httpx.post(
            f"{serve.base}/api/v1/order/create",
            headers={"X-Idempotency-Key": key},
            json={"user_id": "u1", "sku_id": "hot", "quantity": 1, "promotion_id": "promo-1"},
        )
        assert order.status_code == 202
        order_id = order.json()["order_id"]
        assert httpx.get(f"{serve.base}/api/v1/order/{order_id}").status_code == 200
        assert httpx.get(f"{serve.base}/healthz", headers={"Authorization": "Bearer x"})
    finally:
        assert serve.stop() == 0
    logged = lines(serve.log)  # every line of every process parses as JSON
    assert ADMIN_TOKEN not in serve.log.read_text()
    access = [e for e in logged if e["logger"] == "flashgate.access"]
    by_route = {(e["method"], e["route"]): e for e in access}
    put = by_route["PUT", "/api/v1/admin/skus/{sku_id}"]
    assert (put["request_id"], put["status"], put["code"]) == ("req-put-1", 201, "ok")
    created = by_route["POST", "/api/v1/order/create"]
    assert (created["status"], created["code"], created["order_id"]) == (202, "created", order_id)
    assert len(str(created["request_id"])) == 32  # none given: a new one
    assert by_route["GET", "/api/v1/order/{order_id}"]["order_id"] == order_id
    assert {"finalizer", "sweeper"} <= {str(e["msg"]).split()[0] for e in logged}
    assert any(e["logger"].startswith("uvicorn") for e in logged)  # uvicorn's own, as JSON


def test_no_access_log_by_default(tmp_path: Path) -> None:
    serve = Serve(tmp_path / "data")
    try:
        for _ in range(3):
            assert httpx.get(f"{serve.base}/healthz").status_code == 200
    finally:
        assert serve.stop() == 0
    assert not [e for e in lines(serve.log) if e["logger"] == "flashgate.access"]
