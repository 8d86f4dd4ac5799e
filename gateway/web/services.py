"""What the handlers use, passed to the route factories by `create_app` and built by the
lifespan (`Services.start`): the routes exist before the lifespan runs, so they hold this
object and read its collaborators when a request comes."""

from __future__ import annotations

from redis.exceptions import ResponseError

from gateway.intake.breaker import CircuitBreaker
from gateway.intake.keyed import KeyedBuckets
from gateway.intake.limiter import TokenBucket
from gateway.intake.mode import ModeStore, NoticeWatcher
from gateway.intake.rules import LiveRules, RulesStore, from_settings
from gateway.intake.service import Intake, log_transition
from gateway.intake.soldout import SoldOutMemo
from gateway.settings import ConfigError, Settings
from gateway.store.figures import Sampler
from gateway.store.inventory import Inventory
from gateway.telemetry import metrics
from gateway.transport.cluster import ClusterMux
from gateway.transport.connect import Batch, Client, PipelineBatch
from gateway.transport.scripts import ScriptRegistry
from gateway.transport.wire import Multiplexed
from gateway.web.clients import ClientAddress
from gateway.web.operators import RefusalLog


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
            reader or PipelineBatch(redis), scripts, max_age_s=settings.figures_max_age_ms / 1000
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
        self.intake = Intake(
            self.inventory,
            limiter=limiter,
            keyed=keyed,
            breaker=self.breaker,
            memo=memo,
            watcher=self.watcher,
        )
        self.admin_refusals = RefusalLog("admin calls (401 unauthorized)")
        self.signature_refusals = RefusalLog("payment signatures (401 bad_signature)")

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
