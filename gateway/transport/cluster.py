"""Cluster routing for the order path: `ClusterMux`, one multiplexed connection per node and
the slot map, following MOVED and ASK once; a slot on the move is `SlotMoving`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.crc import key_slot
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    RedisError,
    ResponseError,
)

from gateway.transport.replies import REDIS_FAILURES, NotSent, text
from gateway.transport.wire import Multiplexed

log = logging.getLogger("flashgate")


SLOTS = 16384  # hash slots of a Redis Cluster


class SlotMoving(RedisError):
    """The key's slot is moving between cluster nodes (a second redirect, TRYAGAIN or
    CLUSTERDOWN): the command did not run. Answered 503 with Retry-After; the client's
    retry with the same idempotency key is safe."""


_REDIRECTS = ("MOVED ", "ASK ")


def first_key(args: tuple[Any, ...]) -> Any:
    """The key a command is routed by: the first script key of EVAL/EVALSHA, else the first
    argument; None for a command without one (PING, WAITAOF)."""
    name = args[0].upper() if isinstance(args[0], str) else args[0]
    if name in ("EVALSHA", "EVAL", b"EVALSHA", b"EVAL"):
        return args[3] if int(args[2]) > 0 else None
    return args[1] if len(args) > 1 and name not in ("PING", "WAITAOF", "SCRIPT") else None


class ClusterMux:
    """The order path's client on a Redis Cluster: one multiplexed connection per node and the
    slot map, so a script goes straight to the node that owns its keys in one round trip.

    Every script's keys share one hash tag (gateway/store/keys.py), so its first key names its slot.
    A redirected command did not run, so it is followed once: MOVED (the slot has a new owner:
    the map learns it, then reloads) and ASK (the slot is being imported: `ASKING` and the
    command, adjacent on the target's connection). A second redirect, TRYAGAIN (a multi-key
    script while its keys are split by a migration) or CLUSTERDOWN raise SlotMoving. Nothing
    that may have run is ever resent here; the caller's idempotency key handles that.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):  # never echo the URL: a password
            raise ValueError(f"a cluster speaks redis:// or rediss://, not {parts.scheme}://")
        self.timeout_s = timeout_s
        self._parts = parts
        self._seed = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self._nodes: dict[str, Multiplexed] = {}
        self._owner: list[str | None] = [None] * SLOTS
        self._known: list[str] = []  # every node the last CLUSTER SLOTS named
        self._refreshing: asyncio.Task[None] | None = None
        self._loaded = False
        # redirects followed and slot-moving refusals: MOVED, ASK, SLOT_MOVING
        self.redirects: dict[str, int] = {"MOVED": 0, "ASK": 0, "SLOT_MOVING": 0}

    def _node(self, address: str) -> Multiplexed:
        node = self._nodes.get(address)
        if node is None:
            p = self._parts
            userinfo = p.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@{address}" if userinfo else address
            url = f"{p.scheme}://{netloc}" + (f"?{p.query}" if p.query else "")
            node = self._nodes[address] = Multiplexed(url, timeout_s=self.timeout_s)
        return node

    async def refresh(self) -> None:
        """Reload the slot map from CLUSTER SLOTS (the seed node first, then any known one)."""
        addresses = list(dict.fromkeys([self._seed, *self._known, *self._nodes]))
        last: Exception | None = None
        for address in addresses:
            try:
                reply = await self._node(address).execute_command("CLUSTER", "SLOTS")
            except REDIS_FAILURES as exc:
                last = exc
                continue
            owner: list[str | None] = [None] * SLOTS
            host = address.rpartition(":")[0]
            known: list[str] = []
            for start, end, primary, *replicas in reply:
                ip = text(primary[0]) or host  # an empty host means the node we asked
                node = f"{ip}:{int(primary[1])}"
                owner[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
                known += [node, *(f"{text(r[0]) or host}:{int(r[1])}" for r in replicas)]
            self._owner = owner
            self._known = list(dict.fromkeys(known))  # asked next time if the seed is down
            self._loaded = True
            return
        raise NotSent(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except REDIS_FAILURES as exc:
            log.warning("cluster slot map not reloaded: %s", exc)

    async def _route(self, args: tuple[Any, ...]) -> Multiplexed:
        if not self._loaded:
            await self.refresh()
        key = first_key(args)
        address = self._seed if key is None else self._owner[key_slot(_as_bytes(key))]
        if address is None:
            self._refresh_soon()
            raise SlotMoving("CLUSTERDOWN: the slot is not served by any node")
        return self._node(address)

    async def execute_command(self, *args: Any, **_options: Any) -> Any:
        return await self._execute(args, None)

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """`Multiplexed.execute_many` across the cluster: the commands grouped by the node
        that owns their slot, one write per node, the nodes in parallel; a redirected command
        is followed once (one more round trip, for those only)."""
        if not self._loaded:
            await self.refresh()
        by_node: dict[str | None, list[int]] = {}
        for i, args in enumerate(commands):
            key = first_key(args)
            address = self._seed if key is None else self._owner[key_slot(_as_bytes(key))]
            by_node.setdefault(address, []).append(i)
        replies: list[Any] = [None] * len(commands)

        async def on_node(address: str | None, indexes: list[int]) -> None:
            try:
                if address is None:
                    self._refresh_soon()
                    raise SlotMoving("CLUSTERDOWN: the slot is not served by any node")
                got = await self._node(address).execute_many([commands[i] for i in indexes])
            except REDIS_FAILURES as exc:
                got = [exc] * len(indexes)
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply

        await asyncio.gather(*(on_node(a, ix) for a, ix in by_node.items()))
        for i, reply in enumerate(replies):
            if isinstance(reply, ResponseError) and str(reply).startswith(_REDIRECTS):
                try:
                    replies[i] = await self._redirected(reply, tuple(commands[i]), None, False)
                except RedisError as exc:
                    replies[i] = exc
        return replies

    @property
    def writes(self) -> int:
        """Writes to every node so far: `Multiplexed.writes`, summed."""
        return sum(node.writes for node in self._nodes.values())

    async def execute_with_barrier(
        self, barrier: tuple[Any, ...], *args: Any, after_reply: bool = False
    ) -> Any:
        """`Multiplexed.execute_with_barrier` on the node that owns the command's keys."""
        return await self._execute(args, barrier, after_reply)

    async def _execute(
        self, args: tuple[Any, ...], barrier: tuple[Any, ...] | None, after_reply: bool = False
    ) -> Any:
        node = await self._route(args)
        try:
            if barrier is None:
                return await node.execute_command(*args)
            return await node.execute_with_barrier(barrier, *args, after_reply=after_reply)
        except ResponseError as exc:
            return await self._redirected(exc, args, barrier, after_reply)
        except RedisConnectionError:
            self._refresh_soon()  # a failover may have promoted a replica
            raise

    async def _redirected(
        self,
        exc: ResponseError,
        args: tuple[Any, ...],
        barrier: tuple[Any, ...] | None,
        after_reply: bool,
    ) -> Any:
        message = str(exc)
        if message.startswith(("TRYAGAIN", "CLUSTERDOWN")):
            self._refresh_soon()
            self.redirects["SLOT_MOVING"] += 1
            raise SlotMoving(message) from exc
        if not message.startswith(_REDIRECTS):
            raise exc
        target = self._node(self._learn(exc))
        try:
            if message.startswith("ASK "):
                return await target.execute_asking(args, barrier, after_reply)
            if barrier is None:
                return await target.execute_command(*args)
            return await target.execute_with_barrier(barrier, *args, after_reply=after_reply)
        except ResponseError as again:
            if str(again).startswith((*_REDIRECTS, "TRYAGAIN", "CLUSTERDOWN")):
                self._refresh_soon()
                self.redirects["SLOT_MOVING"] += 1
                raise SlotMoving(f"slot moving: {again}") from again
            raise
        except RedisConnectionError:
            self._refresh_soon()
            raise

    def _learn(self, exc: ResponseError) -> str:
        """The node a redirect names; a MOVED also updates the map and reloads it."""
        kind, slot, address = str(exc).split()[:3]
        self.redirects[kind] = self.redirects.get(kind, 0) + 1
        if kind == "MOVED":
            self._owner[int(slot)] = address
            self._refresh_soon()
        return address

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self._nodes.values():
            await node.aclose()
        self._nodes.clear()


def _as_bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()
