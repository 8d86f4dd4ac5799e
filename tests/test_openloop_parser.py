"""The open-loop generator's answer parser (bench/openloop.py): answers split anywhere, with
`content-length` in any place of the head, each counted once with its own status."""

from __future__ import annotations

import pytest

from bench.openloop import _Conn

BODY = b'{"order_id":"abc","status":"HELD"}'
LAST = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
FIRST = b"HTTP/1.1 409 Conflict\r\ncontent-length: %d\r\nidempotent-replayed: true\r\n\r\n%s"


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_every_answer_is_counted_once_with_its_status(chunk: int) -> None:
    seen: list[bytes] = []
    conn = _Conn(lambda _conn, status: seen.append(status))
    stream = (LAST % (len(BODY), BODY) + FIRST % (len(BODY), BODY)) * 3
    for at in range(0, len(stream), chunk):
        conn.data_received(stream[at : at + chunk])
    assert seen == [b"202", b"409"] * 3
    assert conn.buf == b""
