"""Fixtures: one real valkey-server per session (the binary flashgate embeds), or
FLASHGATE_TEST_REDIS_URL; a flushed client per test; an app factory that runs the lifespan."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.ops.embedded import free_port, server_binary, server_env, wait_for_ping
from gateway.settings import Settings
from gateway.transport.connect import create_client
from gateway.transport.scripts import ScriptRegistry
from gateway.web.app import create_app
from tests.support.api import ADMIN_TOKEN, Client, MakeClient
from tests.support.fairstart import FairStart
from tests.support.rabbitmq import BrokerMissing, RabbitBroker, rabbit_broker
from tests.support.receiver import Receiver
from tests.support.relaying import PAYMENT_SECRET, SECRET, Orders
from tests.support.state import Clock, audit_breaches


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if url := os.environ.get("FLASHGATE_TEST_REDIS_URL"):
        yield url
        return
    port = free_port()
    proc = subprocess.Popen(
        [
            server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        env=server_env("mimalloc"),  # as `flashgate serve` runs it
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_ping(url, 10, proc)
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[RabbitBroker | None]:
    """A real RabbitMQ node (Debian's rabbitmq-server, which `.ci/run` installs) on free ports,
    or None with FLASHGATE_TEST_RABBITMQ_URL (an existing broker, which tests cannot restart).
    A missing rabbitmq-server fails the tests that need it, naming `.ci/run`."""
    if os.environ.get("FLASHGATE_TEST_RABBITMQ_URL"):
        yield None
        return
    missing = ""
    try:
        with rabbit_broker() as broker:
            yield broker
    except BrokerMissing as exc:  # raised before the yield: the tests fail, none is skipped
        missing = str(exc)
    if missing:
        pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_broker: RabbitBroker | None) -> str:
    if rabbitmq_broker is None:
        return os.environ["FLASHGATE_TEST_RABBITMQ_URL"]
    return rabbitmq_broker.url


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-primary Valkey cluster from the embedded binary, or
    FLASHGATE_TEST_CLUSTER_URL (a node of an existing cluster)."""
    if url := os.environ.get("FLASHGATE_TEST_CLUSTER_URL"):
        yield url
        return
    from gateway.ops.localcluster import LocalCluster

    with LocalCluster(tmp_path_factory.mktemp("cluster"), primaries=3) as cluster:
        yield cluster.url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    node = metafunc.definition
    if (
        "backend" in metafunc.fixturenames
        and node.get_closest_marker("both_backends")
        and not node.get_closest_marker("one_server")
    ):
        metafunc.parametrize("backend", ["single", "cluster"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", os.environ.get("FLASHGATE_TEST_BACKEND", "single")))


@pytest.fixture
def settings(backend: str, request: pytest.FixtureRequest) -> Settings:
    # A generous deadline: correctness tests must not turn into timing tests on a busy CI
    # machine. Deadlines and faults are tested with their own settings in test_store.py.
    # The ops reads fresh at every request: a test reads what it just did (the shared reading
    # and its age are tested in test_figures.py).
    common: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN, "redis_timeout_ms": 10_000, "figures_max_age_ms": 0
    }  # fmt: skip
    if backend == "cluster":
        url = request.getfixturevalue("cluster_url")
        return Settings(redis_url=url, redis_cluster=True, **common)
    url = request.getfixturevalue("redis_url")
    return Settings(redis_url=url, **common)


@pytest.fixture
async def redis(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A flushed client. After the test, the audit must be clean for every SKU, unless the
    test is marked `corrupts` (it breaks records on purpose)."""
    client = create_client(settings)
    await client.flushall()
    yield client
    try:
        if request.node.get_closest_marker("corrupts") is None:
            assert await audit_breaches(client, settings) == {}
    finally:
        await client.aclose()


@pytest.fixture
async def make_client(redis: Redis, settings: Settings) -> AsyncIterator[MakeClient]:
    """make_client(**setting_overrides) -> an httpx client on a started app."""
    stack = contextlib.AsyncExitStack()

    async def make(**overrides: Any) -> Client:
        app = create_app(settings.replace(**overrides), redis=redis)
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://flashgate.test")
        )

    yield make
    await stack.aclose()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real webhook receiver on a free port, verifying every signature (tests/support)."""
    r = Receiver(SECRET)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def scripts(redis: Redis) -> ScriptRegistry:
    """Every script loaded into the test's server."""
    registry = ScriptRegistry()
    await registry.load_all(redis)
    return registry


@pytest.fixture
def fs(redis: Redis, scripts: ScriptRegistry, settings: Settings) -> FairStart:
    """A fair-start sale on the test's server (tests/support/fairstart.py)."""
    return FairStart(redis, scripts, settings)


@pytest.fixture
async def orders(
    redis: Redis, scripts: ScriptRegistry, settings: Settings, make_client: MakeClient
) -> Orders:
    """Final events made the real way for the relay's tests (tests/support/relaying.py), on
    an app that takes signed payments (`orders.client`)."""
    return Orders(redis, scripts, settings, await make_client(payment_secret=PAYMENT_SECRET))
