"""Settings: one frozen dataclass, read from the environment (env > .env > default)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PREFIX = "FLASHGATE_"
DEFAULT_BUSY_MESSAGE = "活动火爆,请稍后再试"

# Settings whose environment name is not PREFIX + upper-case field name.
_ENV_NAMES = {"redis_url": "REDIS_URL"}


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


_CHOICES: dict[str, tuple[object, ...]] = {
    "redis_client": ("mux", "pool"),
    "appendfsync": ("everysec", "always"),
    "waitaof_local": (0, 1),
    "log_format": ("json", "text"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway, finalizer, sweeper and CLI read. Times carry their unit."""

    redis_url: str | None = None
    redis_cluster: bool = False
    redis_timeout_ms: int = 1000
    redis_max_connections: int = 64
    claim_stale_ms: int = 5000  # cluster mode: an idempotency claim this old may be abandoned
    redis_client: str = "mux"  # the order path's client: "mux" (one pipelined connection) or "pool"
    # durability of an accepted order or payment before its 202 (README "Durability")
    appendfsync: str = "everysec"  # the embedded server's: "everysec" or "always"
    waitaof_local: int = 0  # 1: WAITAOF for the local AOF on disk
    waitaof_replicas: int = 0  # N: WAITAOF for the AOF of N replicas
    # the secrets: never in a repr, so never in a log line or a traceback
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    payment_secret: str | None = dataclasses.field(default=None, repr=False)
    hold_ttl_s: int = 900
    idempotency_ttl_s: int = 86_400
    qps: float = 5000.0
    burst: int = 1000
    breaker_rt_ms: int = 800
    breaker_slow_ratio: float = 0.5
    breaker_min_calls: int = 5
    breaker_window_ms: int = 1000
    breaker_open_s: float = 10.0
    max_quantity: int = 100
    max_body_bytes: int = 4096
    client_timeout_s: float = 10.0  # a request's head and body must arrive within it (408)
    queue_max: int = 50_000
    mode_refresh_ms: int = 500
    soldout_recheck_ms: int = 1000
    bucket_file: str | None = None
    finalizer_batch: int = 200
    finalizer_block_ms: int = 1000
    finalizer_claim_idle_ms: int = 30_000
    finalizer_max_deliveries: int = 5
    sweep_interval_ms: int = 1000
    sweep_batch: int = 100
    busy_message: str = DEFAULT_BUSY_MESSAGE
    data_dir: str = ".flashgate"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    access_log: bool = False
    log_level: str = "info"
    log_format: str = "json"  # one JSON object per line, or "text" (gateway/logs.py)

    def __post_init__(self) -> None:
        positive = (
            "redis_timeout_ms",
            "redis_max_connections",
            "claim_stale_ms",
            "hold_ttl_s",
            "idempotency_ttl_s",
            "burst",
            "breaker_rt_ms",
            "breaker_min_calls",
            "breaker_window_ms",
            "max_quantity",
            "max_body_bytes",
            "queue_max",
            "mode_refresh_ms",
            "soldout_recheck_ms",
            "finalizer_batch",
            "finalizer_block_ms",
            "finalizer_max_deliveries",
            "sweep_interval_ms",
            "sweep_batch",
            "workers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.mode_refresh_ms > 1000:
            # The contract: every worker applies a switch within one second, notice or not.
            raise ConfigError(f"{env_name('mode_refresh_ms')} must be <= 1000")
        for name in ("finalizer_claim_idle_ms", "waitaof_replicas"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)} must be >= 0")
        for name in ("qps", "client_timeout_s", "breaker_open_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.breaker_slow_ratio <= 1.0:
            raise ConfigError(f"{env_name('breaker_slow_ratio')} must be within 0..1")
        self._check_cluster()
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{env_name(name)} must be {' or '.join(map(str, allowed))}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{env_name('port')} must be a TCP port, got {self.port}")

    def _check_cluster(self) -> None:
        if not self.redis_cluster:
            return
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ConfigError(f"{env_name('redis_cluster')}=1 needs a redis:// or rediss:// URL")
        if (self.waitaof_local or self.waitaof_replicas) and self.redis_client != "mux":
            # WAITAOF must reach the node that ran the write: the mux routes it there
            raise ConfigError(
                f"{env_name('waitaof_local')}/{env_name('waitaof_replicas')} in cluster "
                f"mode need {env_name('redis_client')}=mux"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
    ) -> Settings:
        """Read every setting from `environ` (default os.environ), then `.env`, then defaults."""
        env = dict(read_dotenv(dotenv)) if dotenv else {}
        env.update(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = env_name(field.name)
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(name, raw, field.type)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` in a child process give these settings."""
        out: dict[str, str] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            out[env_name(field.name)] = str(value)
        return out

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_token)


def env_name(field_name: str) -> str:
    return _ENV_NAMES.get(field_name, PREFIX + field_name.upper())


def read_dotenv(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines; `#` comments and blank lines ignored; surrounding quotes stripped."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip().removeprefix("export ").strip()] = value
    return out


def _parse(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind}") from None
    return raw
