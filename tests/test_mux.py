"""The multiplexed client of the order path, against the real server: every reply reaches its
own caller whatever the concurrency, cancellations and deadlines; errors keep redis-py's types;
a dead or stalled connection is replaced."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from gateway.transport.replies import NotSent
from gateway.transport.wire import Multiplexed, _encode
from tests.support.faultproxy import FaultProxy


async def test_replies_reach_their_own_callers_under_concurrency(redis_url: str) -> None:
    mux = Multiplexed(redis_url, timeout_s=10)
    payloads = [uuid.uuid4().hex * (i % 7 + 1) for i in range(5000)]
    answers = await asyncio.gather(*(mux.execute_command("ECHO", p) for p in payloads))
    assert answers == [p.encode() for p in payloads]
    await mux.aclose()


async def test_reply_types(redis_url: str, redis: Redis) -> None:
    mux = Multiplexed(redis_url, timeout_s=10)
    await redis.rpush("mux:list", "a", "b")
    assert await mux.execute_command("GET", "mux:missing") is None
    assert await mux.execute_command("INCRBY", "mux:n", 41) == 41
    assert await mux.execute_command("LRANGE", "mux:list", 0, -1) == [b"a", b"b"]
    assert await mux.execute_command("EVAL", "return {1, {'x', 2.5}}", 0) == [1, [b"x", 2]]
    assert await mux.execute_command("SET", "mux:f", 1.5) == b"OK"
    assert await redis.get("mux:f") == b"1.5"
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await mux.execute_command("INCR", "mux:list")
    with pytest.raises(NoScriptError):
        await mux.execute_command("EVALSHA", "0" * 40, 0)
    assert await mux.execute_command("PING") == b"PONG"  # still in step after the errors
    await mux.aclose()


async def test_cancelled_callers_do_not_shift_the_replies(redis_url: str) -> None:
    mux = Multiplexed(redis_url, timeout_s=10)
    tasks = [asyncio.ensure_future(mux.execute_command("ECHO", str(i))) for i in range(400)]
    await asyncio.sleep(0)  # every command queued, none answered yet
    for t in tasks[::2]:
        t.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
    assert done[1::2] == [str(i).encode() for i in range(1, 400, 2)]
    assert await mux.execute_command("ECHO", "after") == b"after"
    await mux.aclose()


async def test_a_late_answer_times_out_and_the_next_command_is_in_step(redis_url: str) -> None:
    proxy = FaultProxy(redis_url, marker=b"ECHO")
    async with proxy as url:
        mux = Multiplexed(url, timeout_s=0.2)
        assert await mux.execute_command("PING") == b"PONG"
        proxy.delay_once_s = 3.0
        start = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await mux.execute_command("ECHO", "late")
        assert time.monotonic() - start < 2.0  # the deadline, not the answer, ended it
        assert await mux.execute_command("ECHO", "next") == b"next"  # never "late"
        assert proxy.connections == 2  # the stalled connection was replaced
        await mux.aclose()


async def test_a_hang_ends_every_caller_at_the_deadline(redis_url: str) -> None:
    proxy = FaultProxy(redis_url, mode="hang", marker=b"ECHO")
    async with proxy as url:
        mux = Multiplexed(url, timeout_s=0.2)
        start = time.monotonic()
        done = await asyncio.gather(
            *(mux.execute_command("ECHO", str(i)) for i in range(50)), return_exceptions=True
        )
        assert time.monotonic() - start < 2.0  # the deadline (0.2 s), never a hang
        assert all(isinstance(d, RedisTimeoutError) for d in done)
        proxy.mode = "pass"
        assert await mux.execute_command("ECHO", "back") == b"back"
        await mux.aclose()


async def test_a_reset_fails_the_callers_and_the_next_command_reconnects(
    redis_url: str,
) -> None:
    proxy = FaultProxy(redis_url, mode="reset", marker=b"ECHO")
    async with proxy as url:
        mux = Multiplexed(url, timeout_s=5)
        assert await mux.execute_command("PING") == b"PONG"
        with pytest.raises(RedisConnectionError) as info:
            await mux.execute_command("ECHO", "x")
        assert not isinstance(info.value, NotSent)  # it left: the caller may resend
        proxy.mode = "pass"
        assert await mux.execute_command("ECHO", "y") == b"y"
        assert proxy.connections == 2
        await mux.aclose()


async def test_refused_connect_is_not_sent_and_fast() -> None:
    from gateway.ops.embedded import free_port

    mux = Multiplexed(f"redis://127.0.0.1:{free_port()}/0", timeout_s=5)
    start = time.monotonic()
    with pytest.raises(NotSent):
        await mux.execute_command("PING")
    assert time.monotonic() - start < 1.0
    await mux.aclose()


async def test_url_credentials_and_database(redis_url: str, redis: Redis) -> None:
    user, password = f"mux{uuid.uuid4().hex[:8]}", "p@ss:word"
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        host = redis_url.split("://", 1)[1].split("/", 1)[0]
        mux = Multiplexed(f"redis://{user}:p%40ss%3Aword@{host}/3", timeout_s=5)
        assert await mux.execute_command("ACL", "WHOAMI") == user.encode()
        await mux.execute_command("SET", "mux:db3", "here")
        await mux.aclose()
        bad = Multiplexed(f"redis://{user}:wrong@{host}/0", timeout_s=5)
        with pytest.raises(NotSent):
            await bad.execute_command("PING")
        await bad.aclose()
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
    assert await redis.get("mux:db3") is None  # not in db 0
    other = Redis.from_url(f"redis://{host}/3")
    assert await other.get("mux:db3") == b"here"
    await other.delete("mux:db3")
    await other.aclose()


def test_encoding_is_resp() -> None:
    assert (
        _encode(("SET", b"k", 7, 1.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n$3\r\n1.5\r\n"
    )
    assert _encode(("ECHO", "é")) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        _encode(("SET", None))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (the openssl command line)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_with_the_servers_ca_verified(
    redis_url: str, tls_files: tuple[Path, Path]
) -> None:
    """rediss:// through a TLS endpoint in front of the real server: verified against the
    given CA; an unknown certificate is refused before any command leaves."""
    cert, key = tls_files
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    async with FaultProxy(redis_url, tls=server_side) as url:
        assert url.startswith("rediss://")
        mux = Multiplexed(f"{url}?ssl_ca_certs={cert}", timeout_s=5)
        assert await mux.execute_command("ECHO", "over tls") == b"over tls"
        await mux.aclose()
        strict = Multiplexed(url, timeout_s=5)  # the system's CAs do not know this one
        with pytest.raises(NotSent, match="CERTIFICATE_VERIFY_FAILED"):
            await strict.execute_command("PING")
        await strict.aclose()
        unchecked = Multiplexed(f"{url}?ssl_cert_reqs=none", timeout_s=5)
        assert await unchecked.execute_command("PING") == b"PONG"
        await unchecked.aclose()


def test_a_refused_url_is_never_echoed() -> None:
    """The URL may carry the password: the error names the scheme only."""
    with pytest.raises(ValueError) as info:
        Multiplexed("http://user:s3cret@example.test:6379/0", timeout_s=1)
    assert "s3cret" not in str(info.value)
    assert "http://" in str(info.value)
