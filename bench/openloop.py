"""An open-loop HTTP load generator: requests start at a fixed offered rate whatever the server
does, and each latency runs from the request's *intended* start, so a slow server cannot hide
its queue (no coordinated omission).

    python -m bench.openloop --port 8080 --rate 2000 --duration 5 --sku bench-intake

Prints one JSON object: offered and achieved rate, answers by status, latency percentiles (ms),
and the generator's own lag (how late it sent, its millisecond timer included). A request that
had to wait for a free connection counts from its intended start, so the server's queue is
always in the figure; one sent on its tick counts from the send.
Requests go to the order endpoint over keep-alive connections; the body and key vary per request
(`--kind unique`: a new shopper and key each time; `--kind replay`: keys read from a file).
Run it pinned to a core of its own or shared with Redis, never with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import uvloop

PATH = "/api/v1/order/create"
# uvloop's loop.time() is libuv's cached millisecond clock: too coarse for latencies
clock = time.perf_counter


def order_request(host: str, path: str, sku: str, promo: str, user: str, key: str) -> bytes:
    body = b'{"user_id":"%s","sku_id":"%s","quantity":1,"promotion_id":"%s"}' % (
        user.encode(),
        sku.encode(),
        promo.encode(),
    )
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % (
        path.encode(),
        host.encode(),
    ) + b"X-Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)


def unique_requests(host: str, path: str, sku: str, promo: str) -> Iterator[bytes]:
    """A new shopper and a new key per request (keys are UUID-shaped and never repeat)."""
    run = uuid.uuid4().hex[:8]
    i = 0
    while True:
        i += 1
        key = f"{run}-0000-4000-8000-{i:012x}"
        yield order_request(host, path, sku, promo, f"b{run}{i}", key)


def replay_requests(host: str, path: str, sku: str, promo: str, pairs: Path) -> Iterator[bytes]:
    """Requests whose (user, key) were accepted before: each answer is a replay."""
    rows = [line.split() for line in pairs.read_text().splitlines() if line.strip()]
    while True:
        for user, key in rows:
            yield order_request(host, path, sku, promo, user, key)


class _Conn(asyncio.Protocol):
    def __init__(self, done: Callable[[_Conn, bytes], None]) -> None:
        self.done = done
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.started = 0.0  # intended start of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            at = head.find(b"content-length:")
            eol = head.find(b"\r\n", at + 15)  # -1: the head's last line
            length = int(head[at + 15 : eol if eol >= 0 else len(head)]) if at >= 0 else 0
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            status, self.buf = self.buf[9:12], self.buf[end:]
            self.done(self, status)


async def run(
    host: str, port: int, rate: float, duration: float, requests: Iterator[bytes], conns: int
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    idle: deque[_Conn] = deque()
    backlog: deque[float] = deque()  # intended starts waiting for a free connection
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()

    def send(conn: _Conn, intended: float, waited: bool) -> None:
        """A request that waited for a free connection counts from its intended start (the
        server's queue); one sent as soon as its tick came counts from the send (the
        generator's millisecond timer is not the server's latency)."""
        now = clock()
        conn.started = intended if waited else now
        lags.append(now - intended)
        assert conn.transport is not None
        conn.transport.write(next(requests))

    def done(conn: _Conn, status: bytes) -> None:
        latencies.append(clock() - conn.started)
        statuses[status.decode()] += 1
        if backlog:
            send(conn, backlog.popleft(), waited=True)
        else:
            idle.append(conn)

    for _ in range(conns):
        _, proto = await loop.create_connection(lambda: _Conn(done), host, port)
        idle.append(proto)
    total = int(rate * duration)
    t0 = clock() + 0.01
    sent = 0
    while sent < total:
        due = min(total, int((clock() - t0) * rate) + 1)
        while sent < due:
            intended = t0 + sent / rate
            sent += 1
            if idle:
                send(idle.popleft(), intended, waited=False)
            else:
                backlog.append(intended)
        await asyncio.sleep(0.0002)
    finish_by = clock() + 10.0  # answers still owed after the last start
    while len(latencies) < total and clock() < finish_by:  # noqa: ASYNC110 (a poll is enough)
        await asyncio.sleep(0.005)
    elapsed = clock() - t0
    for conn in [*idle]:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "offered_rps": rate,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        "sent": total,
        "answered": len(latencies),
        "statuses": dict(statuses),
        "latency_ms": percentiles(latencies),
        "generator_lag_ms": percentiles(lags),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p99.9": at(0.999), "max": at(1.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default=PATH)
    p.add_argument("--rate", type=float, required=True, help="requests started per second")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of offered load")
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--sku", default="bench-intake")
    p.add_argument("--promo", default="bench")
    p.add_argument("--kind", choices=["unique", "replay"], default="unique")
    p.add_argument("--pairs", type=Path, help="for --kind replay: lines of `user key`")
    a = p.parse_args(argv)
    hostport = f"{a.host}:{a.port}"
    if a.kind == "replay":
        if a.pairs is None:
            p.error("--kind replay needs --pairs")
        reqs = replay_requests(hostport, a.path, a.sku, a.promo, a.pairs)
    else:
        reqs = unique_requests(hostport, a.path, a.sku, a.promo)
    started = time.time()
    result = uvloop.run(run(a.host, a.port, a.rate, a.duration, reqs, a.connections))
    result["started_at"] = started
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
