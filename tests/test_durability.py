"""WAITAOF on the order path, against real servers with their AOF on disk and a real replica:
a 202 comes back only once the order is on disk (or on a replica) when that is asked for; one
WAITAOF closes each write of the multiplexed connection (a group commit); a server that
cannot give it is refused at start; an answer not confirmed in time is a 503 whose retry with
the same key replays the one order."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.ops.embedded import free_port, server_binary, wait_for_ping
from gateway.settings import ConfigError, Settings
from gateway.web.app import create_app
from tests.support.api import ADMIN_TOKEN, create, put_sku

pytestmark = pytest.mark.integration


class Server:
    """A valkey-server with its AOF on in its own directory, on a TCP port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(data_dir), "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", *extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_for_ping(self.url, 10, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "primary")
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            yield c


async def waitaof_calls(url: str) -> int:
    r = Redis.from_url(url)
    stats: dict[str, Any] = await r.info("commandstats")
    await r.aclose()
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


@pytest.mark.parametrize("client", ["mux", "pool"])
async def test_orders_wait_for_the_local_aof(primary: Server, client: str) -> None:
    settings = Settings(
        redis_url=primary.url,
        admin_token=ADMIN_TOKEN,
        redis_timeout_ms=10_000,
        redis_client=client,
        waitaof_local=1,
    )
    async with gateway(settings) as c:
        assert (await put_sku(c, stock=100, per_user_limit=1)).status_code == 201
        before = await waitaof_calls(primary.url)
        answers = await asyncio.gather(*(create(c, user_id=f"u{i}") for i in range(60)))
        assert [a.status_code for a in answers] == [202] * 60
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        view = (await c.get("/api/v1/admin/skus/sku-42", headers=auth)).json()
        assert (view["held"], view["available"]) == (60, 40)
    calls = await waitaof_calls(primary.url) - before
    if client == "mux":
        assert 1 <= calls < 60  # one per write of the shared connection, not one per order
    else:
        assert calls == 60  # one pipeline per order on the pool


async def test_a_server_without_aof_is_refused_at_start(redis_url: str) -> None:
    """The session's test server runs without AOF: a local wait can never be given."""
    settings = Settings(redis_url=redis_url, admin_token=ADMIN_TOKEN, waitaof_local=1)
    with pytest.raises(ConfigError, match="appendonly"):
        async with gateway(settings):
            pass


async def test_a_missing_replica_is_503_and_the_retry_replays_once_it_is_there(
    primary: Server, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=primary.url,
        admin_token=ADMIN_TOKEN,
        # WAITAOF gives up after half of it; the replica fsyncs its AOF every second
        redis_timeout_ms=3_000,
        waitaof_replicas=1,
    )
    key = str(uuid.uuid4())
    async with gateway(settings) as c:
        assert (await put_sku(c, stock=5)).status_code == 201
        first = await create(c, key)
        # applied in memory, not confirmed on a replica: not a 202
        assert (first.status_code, first.json()["error"]) == (503, "unavailable")
        assert first.headers["Retry-After"] == "1"
        replica = Server(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
        try:
            for _ in range(100):  # the replica syncs, then acknowledges its AOF
                second = await create(c, key)
                if second.status_code == 202:
                    break
                await asyncio.sleep(0.1)
            assert second.status_code == 202
            assert second.headers.get("Idempotent-Replayed") == "true"  # the first one's order
            third = await create(c, user_id="u2")  # a new order: confirmed by the replica
            assert third.status_code == 202
        finally:
            replica.stop()
        r = Redis.from_url(primary.url)
        sku = await r.hgetall("fg:{sku-42}:sku")
        await r.aclose()
        assert (int(sku[b"held"]), int(sku[b"available"])) == (2, 3)  # one hold per order


def test_settings_refuse_impossible_waits() -> None:
    with pytest.raises(ConfigError, match="FLASHGATE_WAITAOF_LOCAL"):
        Settings(waitaof_local=2)
    with pytest.raises(ConfigError, match="FLASHGATE_WAITAOF_REPLICAS"):
        Settings(waitaof_replicas=-1)
    with pytest.raises(ConfigError, match="FLASHGATE_APPENDFSYNC"):
        Settings(appendfsync="no")


async def command_calls(url: str, name: str) -> int:
    r = Redis.from_url(url)
    stats: dict[str, Any] = await r.info("commandstats")
    await r.aclose()
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_a_replay_writes_so_its_wait_covers_the_order(primary: Server) -> None:
    """WAITAOF covers what its own connection wrote. A replay reaching another worker (or a
    new connection after a lost answer) wrote nothing there, so it touches its record first:
    the wait then covers the order it answers for. Payments alike."""
    settings = Settings(
        redis_url=primary.url, admin_token=ADMIN_TOKEN, redis_timeout_ms=10_000, waitaof_local=1
    )
    key = str(uuid.uuid4())
    async with gateway(settings) as c:
        assert (await put_sku(c, stock=5)).status_code == 201
        assert (await create(c, key)).status_code == 202
        touched = await command_calls(primary.url, "pexpire")
    async with gateway(settings) as other:  # another worker: its own connection
        again = await create(other, key)
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert await command_calls(primary.url, "pexpire") == touched + 1
    r = Redis.from_url(primary.url)
    ttl = await r.pttl(f"fg:{{sku-42}}:idem:u1:{key}")
    await r.aclose()
    assert 86_300_000 < ttl <= 86_400_000  # the same deadline, not a new one


async def test_a_sweeper_completes_stock_transfers_durably(primary: Server) -> None:
    """Stock moved between buckets is waited for like an order: the sweeper completing a
    transfer left halfway does it on a multiplexed client, each write followed by WAITAOF."""
    from gateway.schemas import SkuConfig
    from gateway.store import calls, keys
    from gateway.store.inventory import Inventory
    from gateway.transport.connect import create_client
    from gateway.transport.scripts import ScriptRegistry
    from gateway.workers.sweeper import Sweeper

    settings = Settings(
        redis_url=primary.url, redis_timeout_ms=10_000, waitaof_local=1, claim_stale_ms=1
    )
    client = create_client(settings)
    sweeper = Sweeper(client, ScriptRegistry(), settings)
    try:
        inv = Inventory(client, ScriptRegistry(), settings)
        cfg = SkuConfig(promotion_id="p", stock=30, per_user_limit=5, buckets=3)
        await inv.configure_sku("hot", cfg)
        tags = keys.bucket_tags("hot", 3)
        donor = keys.SkuKeys(tags[1])
        take = calls.take_stock(donor, transfer_id="t1", units=4, to_tag=tags[0], now_ms=None)
        await inv.scripts["take_stock"](client, *take)
        await asyncio.sleep(0.01)
        before = await waitaof_calls(primary.url)
        await sweeper.sweep_once()
        assert sweeper.transfers_completed == 1
        assert await waitaof_calls(primary.url) > before
        view = await inv.get_sku("hot")
        assert view is not None and (view.stock, view.available, view.in_transit) == (30, 30, 0)
    finally:
        await sweeper.aclose()
        await client.aclose()
