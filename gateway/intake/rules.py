"""The runtime rules: the protection settings every gateway applies, changeable without a
restart, shared through Redis like the mode.

`Rules` are the settings of the same names (`gateway/settings.py`: the same types and bounds).
`RulesStore` keeps them in Redis (`set_rules.lua`: a version, the rules as JSON, the history of
changes); the environment only seeds them when Redis has none. `LiveRules` is one process's
copy: it re-reads them on the `rules` notice and on every refresh of the `NoticeWatcher`
(`mode.py`), and applies a new version to the process's token bucket, per-client buckets and
breaker at once, their state kept.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, get_type_hints

import msgspec

from gateway import errors
from gateway.intake.breaker import CircuitBreaker
from gateway.intake.keyed import KeyedBuckets
from gateway.intake.limiter import TokenBucket
from gateway.settings import Settings, env_name
from gateway.store import calls, keys
from gateway.store.keys import DEFAULT_OPERATOR
from gateway.store.outcomes import RulesChange, RulesResult
from gateway.telemetry import metrics
from gateway.transport.connect import Client

log = logging.getLogger("flashgate")

NAMES = (
    "qps",
    "burst",
    "breaker_rt_ms",
    "breaker_slow_ratio",
    "breaker_min_calls",
    "breaker_window_ms",
    "breaker_open_s",
    "client_qps",
    "client_burst",
    "user_qps",
    "user_burst",
)
HISTORY_KEPT = 20
CHANGE_TRIES = 20  # compare-and-set rounds before a change gives up (concurrent changes)
NOTICE = b"rules"

_HINTS = get_type_hints(Settings, include_extras=True)
_DEFAULTS = Settings()

# The rules in force: every one, typed and bounded as its setting. A stored rule missing from
# the JSON (written by an older gateway) takes its setting's default.
Rules = msgspec.defstruct(
    "Rules",
    [(n, _HINTS[n], getattr(_DEFAULTS, n)) for n in NAMES],
    kw_only=True,
    frozen=True,
)
# A change: any subset of the rules; an unknown field is refused.
RulesPatch = msgspec.defstruct(
    "RulesPatch",
    [(n, _HINTS[n] | msgspec.UnsetType, msgspec.UNSET) for n in NAMES],
    kw_only=True,
    frozen=True,
    forbid_unknown_fields=True,
)


# One change of the rules: when (epoch ms), who, from where (None: unknown), the rules before
# and after.
RuleChange = msgspec.defstruct(
    "RuleChange",
    [("at", int), ("by", str), ("client", str | None), ("before", Rules), ("after", Rules)],
    kw_only=True,
    frozen=True,
)
# The answer: the rules in force, their version (one more per change) and the last changes,
# newest first.
RulesView = msgspec.defstruct(
    "RulesView",
    [("version", int), ("history", list[RuleChange])],  # type: ignore[valid-type]
    bases=(Rules,),
    kw_only=True,
    frozen=True,
)

patch_decoder = msgspec.json.Decoder(RulesPatch)
_rules_decoder = msgspec.json.Decoder(Rules)
_history_decoder = msgspec.json.Decoder(RuleChange)
_encoder = msgspec.json.Encoder()


def from_settings(settings: Settings) -> Any:
    """The rules the environment gives: the first values, seeded when Redis has none."""
    return Rules(**{n: getattr(settings, n) for n in NAMES})


def merged(rules: Any, patch: Any) -> Any:
    """`rules` with the fields `patch` sets."""
    changes = {n: v for n in NAMES if (v := getattr(patch, n)) is not msgspec.UNSET}
    return msgspec.structs.replace(rules, **changes)


def unheeded(version: int, rules: Any, initial: Any) -> None:
    """Say at start-up which settings of the environment the rules in Redis override: they
    only seed the rules of a new Redis, so a changed variable and a restart change nothing."""
    shown = ", ".join(
        f"{n}={getattr(rules, n)} ({env_name(n)}={getattr(initial, n)})"
        for n in NAMES
        if getattr(rules, n) != getattr(initial, n)
    )
    log.warning(
        "runtime rules version %d from Redis apply, not the environment: %s; change them with "
        "PUT /api/v1/admin/rules",
        version,
        shown,
    )


class RulesStore:
    """The rules in Redis: read (seeded from `initial` when absent), viewed, changed."""

    def __init__(self, redis: Client, scripts: Any, initial: Any) -> None:
        self.redis = redis
        self.initial = initial
        self._set = scripts["set_rules"]

    async def read(self) -> tuple[int, Any]:
        """The version and rules in force; seeds the initial rules when there are none."""
        found: list[bytes | None] = await self.redis.hmget(keys.RULES, "version", "rules")  # type: ignore[assignment]
        version, raw = found
        if version is None or not raw:
            change = await self._run(-1, _encoder.encode(self.initial), "", "")
            return change.version, _rules_decoder.decode(change.rules)
        return int(version), _rules_decoder.decode(raw)

    async def view(self, limit: int = HISTORY_KEPT) -> Any:
        version, rules = await self.read()
        history: list[bytes] = await self.redis.lrange(keys.RULES_HISTORY, 0, limit - 1)  # type: ignore[assignment]
        return RulesView(
            **msgspec.structs.asdict(rules),
            version=version,
            history=[_history_decoder.decode(entry) for entry in history],
        )

    async def change(
        self, patch: Any, *, by: str = DEFAULT_OPERATOR, client: str = ""
    ) -> tuple[bool, Any, Any]:
        """Apply `patch` to the rules in force: (changed, before, after). A patch that
        changes nothing records nothing. Concurrent changes are merged one after the other."""
        for _ in range(CHANGE_TRIES):
            version, before = await self.read()
            after = merged(before, patch)
            if after == before:
                return False, before, before
            change = await self._run(version, _encoder.encode(after), by, client)
            if change.code is RulesResult.SET:
                return True, before, after
        raise errors.BackendUnavailable("the rules kept changing under this change; try again")

    async def _run(self, expected: int, rules: bytes, by: str, client: str) -> RulesChange:
        call = calls.set_rules(
            expected_version=expected,
            rules=rules,
            channel=keys.NOTICES,
            history_kept=HISTORY_KEPT,
            by=by,
            client=client,
        )
        return RulesChange.of(await self._set(self.redis, *call))


class LiveRules:
    """One process's rules, applied to its order path's protections. `refresh` is what the
    `NoticeWatcher` calls on the `rules` notice and on every periodic refresh."""

    notice = NOTICE

    def __init__(
        self,
        store: RulesStore,
        *,
        limiter: TokenBucket,
        keyed: KeyedBuckets,
        breaker: CircuitBreaker,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.keyed = keyed
        self.breaker = breaker
        self.version = -1  # none read yet
        self.rules = store.initial
        self._reading = asyncio.Lock()
        self.apply(self.rules)

    async def refresh(self) -> None:
        """Read the rules in force and apply them if they changed. One read at a time, so a
        read that began before a change never lands after the one that saw it."""
        async with self._reading:
            try:
                version, rules = await self.store.read()
            except msgspec.DecodeError as exc:  # the rules in Redis were damaged by hand
                log.error(
                    "runtime rules in Redis unreadable (%s); keeping version %d", exc, self.version
                )
                return
            metrics.worker().rules_version.set(version)
            if version == self.version and rules == self.rules:
                return
            if self.version >= 0:  # not the first read
                log.warning("runtime rules version %d -> %d", self.version, version)
            elif rules != self.store.initial:
                unheeded(version, rules, self.store.initial)
            self.version = version
            self.rules = rules
            self.apply(rules)

    def apply(self, rules: Any) -> None:
        self.limiter.configure(rules.qps, rules.burst)
        self.keyed.configure(rules.user_qps, rules.user_burst, rules.client_qps, rules.client_burst)
        self.breaker.configure(
            rt_ms=rules.breaker_rt_ms,
            slow_ratio=rules.breaker_slow_ratio,
            min_calls=rules.breaker_min_calls,
            window_ms=rules.breaker_window_ms,
            open_s=rules.breaker_open_s,
        )
