"""The intake mode (NORMAL | QUEUE_ONLY), shared through Redis by every worker and instance.

`ModeStore` reads and switches the mode in Redis (`switch_mode.lua` records the change and
publishes a notice). `NoticeWatcher` keeps one process's copy: it subscribes to the notice
channel and also re-reads the mode every `refresh_s`, so a lost notice (a reconnect, a
restarted server) delays a switch by at most that long. While Redis is unreachable the last
mode read stays in force. Other state shared the same way (the runtime rules, `rules.py`)
rides on the same watcher as a `Shared`: its own notice, re-read with the mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from gateway.intake.soldout import SoldOutMemo
from gateway.schemas import Mode
from gateway.store import calls, keys
from gateway.store.keys import DEFAULT_OPERATOR
from gateway.store.outcomes import ModeChange
from gateway.telemetry import metrics
from gateway.transport.connect import Client
from gateway.transport.replies import REDIS_FAILURES

log = logging.getLogger("flashgate")

HISTORY_KEPT = 100
LISTEN_WAKE_S = 1.0  # longest a stop waits for the notice listener


class ModeSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the mode history (kept as JSON in Redis by `switch_mode.lua`, sent as is)."""

    from_: Mode = msgspec.field(name="from")
    to: Mode
    at: int  # epoch ms
    # Who and from where; absent in entries recorded before the operator audit.
    by: str | msgspec.UnsetType = msgspec.UNSET
    client: str | None | msgspec.UnsetType = msgspec.UNSET  # None: unknown


class ModeView(msgspec.Struct, frozen=True, kw_only=True):
    mode: Mode
    changed_at: int | None  # epoch ms of the last switch, None: never switched
    history: msgspec.Raw  # [ModeSwitch, ...] newest first


class ModeStore:
    def __init__(self, redis: Client, scripts: Any) -> None:
        self.redis = redis
        self._switch = scripts["switch_mode"]

    async def read(self) -> Mode:
        raw: bytes | None = await self.redis.hget(keys.MODE, "mode")  # type: ignore[assignment]
        return Mode(raw.decode()) if raw else Mode.NORMAL

    async def view(self, limit: int = 20) -> ModeView:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.MODE, "mode", "changed_at")
            pipe.lrange(keys.MODE_HISTORY, 0, limit - 1)
            (mode, changed_at), history = await pipe.execute()
        return ModeView(
            mode=Mode(mode.decode()) if mode else Mode.NORMAL,
            changed_at=int(changed_at) if changed_at else None,
            history=msgspec.Raw(b"[" + b",".join(history) + b"]"),
        )

    async def switch(self, mode: Mode, *, by: str = DEFAULT_OPERATOR, client: str = "") -> bool:
        """Set the mode; True when it changed. Every gateway applies it within `refresh_s`.
        A change is recorded with who made it (`by`) and from where (`client`, "" unknown)."""
        call = calls.switch_mode(
            mode=mode.value, channel=keys.NOTICES, history_kept=HISTORY_KEPT, by=by, client=client
        )
        return bool(ModeChange.of(await self._switch(self.redis, *call)).changed)


class Shared(Protocol):
    """State a process copies from Redis: re-read on its notice and with every refresh."""

    notice: bytes

    async def refresh(self) -> None: ...


class NoticeWatcher:
    """This process's copy of the mode and of the `shared` state, and the sold-out memo's
    `stock:<sku>` notices."""

    def __init__(
        self,
        redis: Client,
        store: ModeStore,
        memo: SoldOutMemo,
        *,
        refresh_s: float = 0.5,
        shared: Sequence[Shared] = (),
    ) -> None:
        self.redis = redis
        self.store = store
        self.memo = memo
        self.refresh_s = refresh_s
        self.shared = tuple(shared)
        self._notices = {b"mode", *(s.notice for s in self.shared)}
        self._mode = Mode.NORMAL
        self.connected = False
        self._heard = asyncio.Event()  # the first subscription was confirmed
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def mode(self) -> Mode:
        """The mode this process applies."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        self._mode = value
        metrics.worker().queue_only.set(1 if value is Mode.QUEUE_ONLY else 0)

    async def start(self, listen_timeout_s: float = 2.0) -> None:
        """Read the mode once (start-up fails fast without Redis), then watch in the background:
        one task listens for notices, one re-reads the mode every `refresh_s`. Waits (bounded)
        for the subscription, so no notice published after start-up is missed."""
        self.mode = await self.store.read()
        for state in self.shared:
            await state.refresh()
        self._tasks = [
            asyncio.create_task(self._listen(), name="flashgate-notices"),
            asyncio.create_task(self._poll(), name="flashgate-mode-refresh"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._heard.wait(), listen_timeout_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a cancellation lost inside a client read must not hang the shutdown.
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks = []

    async def refresh(self) -> None:
        """Re-read the mode and the shared state."""
        mode = await self.store.read()
        if mode is not self.mode:
            log.warning("intake mode %s -> %s", self.mode.value, mode.value)
            self.mode = mode
        for state in self.shared:
            await state.refresh()

    def apply(self, notice: bytes) -> bool:
        """Apply one notice; True when the mode and the shared state must be re-read."""
        if notice in self._notices:
            return True
        if notice.startswith(keys.STOCK_NOTICE):
            self.memo.forget(notice[len(keys.STOCK_NOTICE) :].decode(errors="replace"))
        return False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            with contextlib.suppress(*REDIS_FAILURES):  # the last mode read stays
                await self.refresh()

    async def _listen(self) -> None:
        # A quiet channel is normal (the poll task covers one that went silent without an
        # error). Reads still wake up every second: redis-py can swallow a cancellation inside
        # a read, and the wake-up is where this task notices it was asked to stop.
        me = asyncio.current_task()
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.NOTICES)
                while True:
                    msg = await pubsub.get_message(timeout=LISTEN_WAKE_S)
                    if me is not None and me.cancelling():
                        raise asyncio.CancelledError
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":  # confirmed: from here no notice is missed
                        await self.refresh()  # a switch made before it is read now
                        if self._heard.is_set() and not self.connected:
                            self.memo.clear()  # stock may have changed while we could not hear
                        self.connected = True
                        self._heard.set()
                    elif msg["type"] == "message" and self.apply(msg["data"]):
                        await self.refresh()
            except REDIS_FAILURES as exc:
                if self.connected:
                    log.warning("notice channel lost (%s); keeping mode %s", exc, self.mode.value)
                self.connected = False
                await asyncio.sleep(self.refresh_s)
            finally:
                with contextlib.suppress(*REDIS_FAILURES):
                    await pubsub.aclose()
