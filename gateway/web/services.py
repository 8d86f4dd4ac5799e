"""What the handlers use, passed to the route factories by `create_app` and built by the
lifespan (`Services.start`): the routes exist before the lifespan runs, so they hold this
object and read its collaborators when a request comes.

A process may start while Redis is down (a worker restarted during an outage): it then
answers `/healthz`, `/readyz` 503 and every order `503 unavailable`, and connects in the
background (`Services.connect`), the order path opened once the scripts are loaded and the
mode and the rules read."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import ResponseError

from gateway.intake.breaker import CircuitBreaker
from gateway.intake.keyed import KeyedBuckets
from gateway.intake.limiter import TokenBucket
from gateway.intake.mode import ModeStore, NoticeWatcher
from gateway.intake.rules import LiveRules, RulesStore, from_settings
from gateway.intake.service import Intake, Starting, log_transition
from gateway.intake.soldout import SoldOutMemo
from gateway.settings import ConfigError, Settings
from gateway.store.figures import PER_CALL, Sampler
from gateway.store.inventory import Inventory
from gateway.telemetry import metrics
from gateway.transport.cluster import ClusterMux
from gateway.transport.connect import Batch, Client, PipelineBatch
from gateway.transport.replies import REDIS_FAILURES
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed
from gateway.web.clients import ClientAddress
from gateway.web.operators import RefusalLog

log = logging.getLogger("flashgate")
CONNECT_RETRY_S = (0.5, 5.0)  # Redis down at start: first pause between tries, longest pause


class Services:
    """One process's collaborators. `settings` is there from `create_app`; the rest from
    `start` (in the lifespan) until the app stops."""

    redis: Client
    inventory: Inventory
    intake: Intake
    modes: ModeStore
    watcher: NoticeWatcher
    breaker: CircuitBreaker
    rules: LiveRules
    figures: Sampler  # what Redis holds, for /metrics and the console
    # Refused credentials, logged at most once per 10 s per kind (operators.RefusalLog).
    admin_refusals: RefusalLog
    signature_refusals: RefusalLog

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients = ClientAddress(settings.trusted_proxies)
        self.ready = False  # scripts loaded, mode and rules read: orders go to Redis
        self.not_ready = "starting: Redis has not answered yet"  # why not, for /readyz
        self._connecting: asyncio.Task[None] | None = None

    def start(
        self,
        redis: Client,
        scripts: ScriptRegistry,
        fast: Multiplexed | ClusterMux | None = None,
        reader: Batch | None = None,
    ) -> None:
        """Build everything on a connected client whose scripts are loaded; `reader`: the ops
        reads' own client (default: pipelines on `redis`)."""
        settings = self.settings
        self.redis = redis
        self.figures = Sampler(
            reader or PipelineBatch(redis),
            scripts,
            max_age_s=settings.figures_max_age_ms / 1000,
            per_call=1 if settings.redis_cluster else PER_CALL,
        )
        self.inventory = Inventory(redis, scripts, settings, fast=fast)
        self.breaker = CircuitBreaker(
            rt_ms=settings.breaker_rt_ms,
            slow_ratio=settings.breaker_slow_ratio,
            min_calls=settings.breaker_min_calls,
            window_ms=settings.breaker_window_ms,
            open_s=settings.breaker_open_s,
            on_transition=log_transition,
        )
        metrics.worker().breaker.set(0)  # this worker's series exists from the start
        memo = SoldOutMemo(settings.soldout_recheck_ms / 1000)
        self.modes = ModeStore(redis, scripts)
        path = settings.bucket_file
        limiter = TokenBucket(settings.qps, settings.burst, path=path)
        keyed = KeyedBuckets(path=None if path is None else path + ".clients")
        self.rules = LiveRules(
            RulesStore(redis, scripts, from_settings(settings)),
            limiter=limiter,
            keyed=keyed,
            breaker=self.breaker,
        )
        self.watcher = NoticeWatcher(
            redis,
            self.modes,
            memo,
            refresh_s=settings.mode_refresh_ms / 1000,
            shared=(self.rules,),
        )
        self._intake = Intake(
            self.inventory,
            limiter=limiter,
            keyed=keyed,
            breaker=self.breaker,
            memo=memo,
            watcher=self.watcher,
        )
        # every order 503 until `connect` swaps in the real intake: no check per request
        self.intake = Starting.like(self._intake)
        self.admin_refusals = RefusalLog("admin calls (401 unauthorized)")
        self.signature_refusals = RefusalLog("payment signatures (401 bad_signature)")

    async def connect(self, scripts: ScriptRegistry) -> None:
        """Load the scripts, check WAITAOF, read the mode and the rules and watch them, then
        open the order path. Without Redis, go on trying in the background (from 0.5 s
        between tries, doubling up to 5 s) and return at once; any other failure (a setting
        the server cannot honour, a script it refuses) raises: start-up fails."""
        try:
            await self._open(scripts)
        except REDIS_FAILURES as exc:
            log.warning(
                "cannot reach Redis (%s): orders are answered 503 until it answers; trying "
                "again in %g s", exc, CONNECT_RETRY_S[0],
            )  # fmt: skip
            self._connecting = asyncio.create_task(
                self._connect_later(scripts), name="flashgate-connect"
            )

    async def _open(self, scripts: ScriptRegistry) -> None:
        await scripts.load_all(self.redis)
        await check_waitaof(self.redis, self.settings)
        await self.watcher.start()
        self.intake = self._intake
        self.ready = True

    async def _connect_later(self, scripts: ScriptRegistry) -> None:
        delay = CONNECT_RETRY_S[0]
        while True:
            await asyncio.sleep(delay)
            try:
                await self._open(scripts)
            except REDIS_FAILURES as exc:
                delay = min(delay * 2, CONNECT_RETRY_S[1])
                log.warning("cannot reach Redis (%s); trying again in %g s", exc, delay)
                continue
            except Exception as exc:  # nothing a retry mends: say so, stay not ready
                self.not_ready = f"cannot start: {exc}"
                log.error("Redis answers, but the gateway cannot start: %s", exc)
                return
            log.warning("Redis answers: scripts loaded, mode %s; taking orders",
                        self.watcher.mode.value)  # fmt: skip
            return

    async def stop(self) -> None:
        """Stop connecting and watching (the lifespan's end)."""
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        await self.watcher.stop()

    def close(self) -> None:
        self.admin_refusals.flush()
        self.signature_refusals.flush()
        self.intake.limiter.close()
        self.intake.keyed.close()


async def check_waitaof(client: Client, settings: Settings) -> None:
    """Refuse to start when WAITAOF is asked for and the server cannot give it (older than
    7.2, or no AOF for a local wait): every order would be held, then answered 503."""
    if not (settings.waitaof_local or settings.waitaof_replicas):
        return
    try:
        await client.execute_command("WAITAOF", settings.waitaof_local, 0, 1)
    except ResponseError as exc:
        raise ConfigError(
            "FLASHGATE_WAITAOF_LOCAL/REPLICAS need Redis or Valkey >= 7.2 with appendonly "
            f"yes: the server answered {exc}"
        ) from None
