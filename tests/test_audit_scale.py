"""`flashgate audit` over many SKUs (gateway/ops/audit.py): the order records are found by one
scan of the keyspace, not one scan of the whole keyspace per SKU. A count (SCAN calls, INFO
commandstats on a real Valkey), not a timing; the time at 10,000 SKUs is in
docs/testing/benchmarks.md. Its own app on `redis_url`: see tests/test_figures.py."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.ops import audit
from gateway.settings import Settings
from gateway.transport.connect import create_client
from gateway.web.app import create_app
from tests.support.api import ADMIN_TOKEN, create, put_sku

SKUS = 120


async def scans(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_one_scan_for_every_skus_orders(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    settings = Settings(redis_url=redis_url, admin_token=ADMIN_TOKEN, redis_timeout_ms=30_000)
    client = create_client(settings)
    app = create_app(settings, redis=client)
    try:
        await client.flushall()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
                for i in range(SKUS):
                    assert (await put_sku(c, f"a{i}", stock=3)).status_code == 201
                    for user in ("u1", "u2"):
                        r = await create(c, sku_id=f"a{i}", user_id=user)
                        assert r.status_code == 202
        before = await scans(client)
        assert await audit.audit(settings) == 0
        assert await scans(client) - before < 10  # a scan per SKU would be SKUS or more
        out = capsys.readouterr().out
        assert f"{SKUS} SKU(s), 0 with broken invariants" in out
        assert out.count("HELD:2") == SKUS  # every SKU's records were found and counted
        await client.hset("fg:{a7}:sku", "held", 5)  # and a broken one is still named
        assert await audit.audit(settings) == 1
        assert "a7 " in capsys.readouterr().out.split("BROKEN")[0].splitlines()[-1] + " "
    finally:
        await client.flushall()
        await client.aclose()
