"""Readings of a cluster's layout and replies, for `LocalCluster`: no processes, no I/O.

The slot split among primaries, the CLUSTER INFO fields, the CLUSTER NODES view every node must
share, the owner of a slot in a CLUSTER SLOTS reply.
"""

from __future__ import annotations

from typing import Any

from gateway.transport.cluster import SLOTS

UNSETTLED_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


def check_layout(primaries: int, replicas: int, ports: list[int] | None) -> None:
    """ValueError unless `primaries` with `replicas` replicas each fit `ports` (when given)."""
    if primaries < 1:
        raise ValueError("a cluster needs at least one primary")
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    if ports is not None:
        if len(ports) != primaries * (1 + replicas):
            raise ValueError(
                f"{primaries} primaries with {replicas} replicas each need "
                f"{primaries * (1 + replicas)} ports, got {len(ports)}"
            )
        if len(set(ports)) != len(ports):
            raise ValueError(f"duplicate ports in {ports}")


def slot_range(index: int, primaries: int) -> tuple[int, int]:
    """The first and last slot of primary `index` of `primaries`: even contiguous ranges."""
    return SLOTS * index // primaries, SLOTS * (index + 1) // primaries - 1


def check_slot(slot: int) -> None:
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot {slot} is outside 0..{SLOTS - 1}")


def info_fields(info: str) -> dict[str, str]:
    """CLUSTER INFO (or INFO) as a dict of its `key:value` lines."""
    out: dict[str, str] = {}
    for line in info.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


def incomplete(info: str, nodes: int) -> bool:
    """True unless CLUSTER INFO reports the cluster ok, every slot assigned, `nodes` known."""
    fields = info_fields(info)
    return (
        fields.get("cluster_state") != "ok"
        or fields.get("cluster_slots_assigned") != str(SLOTS)
        or fields.get("cluster_known_nodes") != str(nodes)
    )


def slot_map(nodes: str) -> frozenset[tuple[str, ...]]:
    """CLUSTER NODES reduced to what every node must agree on: id, role, primary, slots; a
    node seen failing, in handshake or disconnected is marked so that no two views match."""
    rows: set[tuple[str, ...]] = set()
    for line in nodes.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = set(parts[2].split(","))
        role = "primary" if "master" in flags else "replica" if "slave" in flags else "?"
        if flags & UNSETTLED_FLAGS or parts[7] != "connected":
            role += "-unsettled"
        # Slot fields; "[slot->-id]" / "[slot-<-id]" mark a migration only this node sees.
        slots = tuple(field for field in parts[8:] if not field.startswith("["))
        rows.add((parts[0], role, parts[3], *slots))
    return frozenset(rows)


def owner_port(slots_reply: Any, slot: int) -> int | None:
    """The port of the primary serving `slot` in a CLUSTER SLOTS reply; None: no node does."""
    for entry in slots_reply:
        first, last, primary = int(entry[0]), int(entry[1]), entry[2]
        if first <= slot <= last:
            return int(primary[1])
    return None
