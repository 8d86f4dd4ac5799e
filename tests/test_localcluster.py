"""LocalCluster: a real Valkey cluster from the embedded binary, its slot map, slot moves
(finished and left in the ASK/TRYAGAIN window), and a stop that leaves no process behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from gateway.ops.localcluster import LocalCluster
from gateway.store.keys import SLOTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def rc(cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    yield client
    client.disconnect_connection_pools()  # close() leaves the nodes' sockets open (redis 8.1)
    client.close()


def cluster_processes(directory: Path) -> list[psutil.Process]:
    """Live processes working in `directory`: a node runs in its data dir `<directory>/<port>`
    (valkey-server rewrites its command line, so that cannot tell the clusters apart)."""
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        cwd = proc.info["cwd"]
        if (
            proc.info["status"] != psutil.STATUS_ZOMBIE
            and cwd
            and Path(cwd).parent == directory.resolve()
        ):
            found.append(proc)
    return found


def other_primary(cluster: LocalCluster, port: int) -> int:
    return next(p for p in cluster.primary_ports if p != port)


def test_three_primaries_serve_every_slot(cluster: LocalCluster) -> None:
    assert len(cluster.primary_ports) == 3
    assert cluster.replica_ports == []
    assert cluster.nodes == [("127.0.0.1", port) for port in cluster.primary_ports]
    assert cluster.url == cluster.urls[0] == f"redis://127.0.0.1:{cluster.primary_ports[0]}"
    for port in cluster.ports:
        info = cluster.client(port).execute_command("CLUSTER", "INFO")
        assert "cluster_state:ok" in info
        assert f"cluster_slots_assigned:{SLOTS}" in info
        assert "cluster_known_nodes:3" in info
    served: dict[int, int] = {}
    for first, last, primary, *_ in cluster.client(cluster.ports[0]).execute_command(
        "CLUSTER", "SLOTS"
    ):
        served[primary[1]] = served.get(primary[1], 0) + last - first + 1
    assert sorted(served) == sorted(cluster.primary_ports)
    assert sum(served.values()) == SLOTS
    # Even contiguous ranges, in port order (the tests below move single slots inside them).
    first, second, third = cluster.primary_ports
    owners = [first, first, second, second, third, third]
    assert [cluster.owner_port(s) for s in (0, 5460, 5461, 10921, 10922, 16383)] == owners


def test_cluster_client_reads_and_writes_on_every_primary(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    by_owner: dict[int, str] = {}
    i = 0
    while len(by_owner) < 3:
        by_owner.setdefault(cluster.owner_port(key_slot(f"key-{i}".encode())), f"key-{i}")
        i += 1
    for port, key in by_owner.items():
        assert rc.set(key, f"on-{port}")
        assert rc.get(key) == f"on-{port}"
        # The key lives on that node: a plain client there reads it without a redirect.
        assert cluster.client(port).get(key) == f"on-{port}"


def test_migrate_slot_moves_the_keys(cluster: LocalCluster, rc: RedisCluster) -> None:
    keys = [f"{{moved}}:{n}" for n in range(7)]
    slot = key_slot(keys[0].encode())
    for n, key in enumerate(keys):
        rc.set(key, n)
    rc.hset("{moved}:hash", mapping={"a": "1", "b": "2"})
    source = cluster.owner_port(slot)
    target = other_primary(cluster, source)

    cluster.migrate_slot(slot, target, keys_batch=3)

    assert cluster.owner_port(slot) == target
    assert [rc.get(key) for key in keys] == [str(n) for n in range(len(keys))]
    assert rc.hgetall("{moved}:hash") == {"a": "1", "b": "2"}
    for port in cluster.primary_ports:  # the keys live on the target; every node knows it
        node = cluster.client(port)
        expected = len(keys) + 1 if port == target else 0
        assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == expected
        if port == target:
            assert node.get(keys[0]) == "0"
        else:
            with pytest.raises(redis.exceptions.MovedError, match=f"^{slot} 127.0.0.1:{target}$"):
                node.get(keys[0])


def test_unfinished_migration_redirects_until_finished(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    slot = key_slot(b"{window}")
    rc.set("{window}:old", "1")
    source = cluster.owner_port(slot)
    target = other_primary(cluster, source)

    cluster.migrate_slot(slot, target, finish=False)

    assert cluster.owner_port(slot) == source  # not handed over yet
    with pytest.raises(redis.exceptions.AskError, match=f"^{slot} 127.0.0.1:{target}$"):
        cluster.client(source).get("{window}:old")
    with pytest.raises(redis.exceptions.MovedError, match=f"^{slot} 127.0.0.1:{source}$"):
        cluster.client(target).get("{window}:old")  # without ASKING
    assert rc.get("{window}:old") == "1"  # the cluster client follows the ASK
    rc.set("{window}:new", "2")
    with cluster.client(target).pipeline(transaction=False) as pipe:
        pipe.execute_command("ASKING")
        pipe.mget("{window}:old", "{window}:missing")
        with pytest.raises(redis.exceptions.TryAgainError):
            pipe.execute()

    cluster.finish_migration(slot, target)

    assert cluster.owner_port(slot) == target
    assert rc.mget("{window}:old", "{window}:new") == ["1", "2"]


def test_a_cluster_that_does_not_settle_in_time_is_stopped(tmp_path: Path) -> None:
    # A primary reports cluster_state:ok no sooner than 2 s after it started.
    cluster = LocalCluster(tmp_path)
    with pytest.raises(
        RuntimeError, match=r"(?s)did not settle within 1 s: .*\ncluster_state:fail\n"
    ):
        cluster.start(timeout_s=1)
    assert cluster.pids == []
    assert cluster_processes(tmp_path) == []


def test_replicas_follow_and_stop_leaves_no_process(tmp_path: Path) -> None:
    # Two primaries: with three, replicas' primaries reach every node by gossip in 2 to 5 s.
    with LocalCluster(tmp_path, primaries=2, replicas=1) as cluster:
        assert len(cluster.nodes) == 4
        for index, port in enumerate(cluster.replica_ports):
            primary_id = cluster.node_id(cluster.primary_ports[index])
            myself = next(
                line
                for line in cluster.client(port).execute_command("CLUSTER", "NODES").splitlines()
                if "myself" in line
            )
            assert "slave" in myself.split()[2]
            assert myself.split()[3] == primary_id
        primary, replica = cluster.primary_ports[0], cluster.replica_ports[0]
        key = next(
            f"key-{i}"
            for i in range(100)
            if cluster.owner_port(key_slot(f"key-{i}".encode())) == primary
        )
        cluster.client(primary).set(key, "copied")
        assert cluster.client(primary).wait(1, 5000) == 1
        with cluster.client(replica).pipeline(transaction=False) as pipe:
            pipe.execute_command("READONLY")
            pipe.get(key)
            assert pipe.execute() == [True, "copied"]
        running = cluster_processes(tmp_path)
        assert sorted(p.pid for p in running) == sorted(cluster.pids)
    assert cluster_processes(tmp_path) == []
    assert not any(p.is_running() for p in running)
    cluster.stop()  # idempotent
