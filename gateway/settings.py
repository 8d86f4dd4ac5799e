"""Settings: one declaration, read from the environment (env > .env > default).

Each field of `Settings` declares one setting whole: its name, its type with bounds or choices
(`Annotated[int, Meta(ge=1)]`, `Literal[...]`), its default and its description (unit
included) in `Meta(description=...)`. `SETTINGS` reads these once; from them come the environment
variables (`FLASHGATE_` + the upper-case name, unless `Meta(extra={"env": ...})` names another),
the command-line flags (`gateway/ops/cli.py`), the errors and `docs/reference/settings.md`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import Meta

from gateway.setting import declare, problems, read_dotenv, reference_page, refusal, text_of

DEFAULT_BUSY_MESSAGE = "活动火爆,请稍后再试"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway, finalizer, sweeper and CLI read. Times carry their unit."""

    redis_url: Annotated[
        str | None,
        Meta(
            description="`redis://`, `rediss://` or `unix://` URL of Redis >= 7 / Valkey >= 7.2;"
            " unset: the embedded server",
            extra={"env": "REDIS_URL"},
        ),
    ] = None
    redis_cluster: Annotated[
        bool,
        Meta(
            description="`1`: `REDIS_URL` (`redis://` or `rediss://`) names any node of a"
            " Redis/Valkey Cluster; the others are found from it (docs/cluster/index.md)"
        ),
    ] = False
    redis_timeout_ms: Annotated[
        int,
        Meta(
            ge=1,
            description="deadline of one Redis call in milliseconds, connect and pool wait"
            " included; no automatic retry",
        ),
    ] = 1000
    redis_max_connections: Annotated[
        int,
        Meta(ge=1, description="pool connections per process (reads, admin, finalizer, sweeper)"),
    ] = 64
    claim_stale_ms: Annotated[
        int,
        Meta(
            ge=1,
            description="cluster mode: age in milliseconds after which an idempotency claim"
            " whose request never finished (its gateway died between the two slots) is"
            " recovered by the next request with that key; also the age after which the"
            " sweeper completes a stock transfer between buckets left halfway",
        ),
    ] = 5000
    redis_client: Annotated[
        Literal["mux", "pool"],
        Meta(
            description="the order path's client: `mux`, one pipelined connection per"
            " process, or `pool`, redis-py's pool (docs/architecture/redis-client.md)"
        ),
    ] = "mux"
    # durability of an accepted order or payment before its 202 (docs/architecture/durability.md)
    appendfsync: Annotated[
        Literal["everysec", "always"],
        Meta(description="the embedded server's `appendfsync` (docs/architecture/durability.md)"),
    ] = "everysec"
    embedded_allocator: Annotated[
        Literal["mimalloc", "libc"],
        Meta(
            description="the embedded server's malloc: `mimalloc` (a fifth less server CPU per"
            " order; Linux, the cmeel-mimalloc wheel; else `libc`, warned) or `libc`, its own"
        ),
    ] = "mimalloc"
    waitaof_local: Annotated[
        Literal[0, 1],
        Meta(
            description="`1`: an order's or payment's `202` waits until it is in the server's"
            " AOF on disk (`WAITAOF`, Redis/Valkey >= 7.2, AOF on)"
        ),
    ] = 0
    waitaof_replicas: Annotated[
        int,
        Meta(ge=0, description="N: the `202` waits until N replicas have it in their AOF"),
    ] = 0
    # the secrets: never in a repr, so never in a log line or a traceback
    admin_token: Annotated[
        str | None,
        Meta(
            description="bearer token of the admin endpoints; unset: they answer"
            " `503 admin_disabled`"
        ),
    ] = dataclasses.field(default=None, repr=False)
    payment_secret: Annotated[
        str | None,
        Meta(
            description="HMAC-SHA256 secret shared with the payment provider; unset:"
            " `503 payments_disabled`"
        ),
    ] = dataclasses.field(default=None, repr=False)
    hold_ttl_s: Annotated[
        int, Meta(ge=1, description="how long an unpaid hold keeps its stock, in seconds")
    ] = 900
    idempotency_ttl_s: Annotated[
        int, Meta(ge=1, description="how long a `202` is replayed for one user and key, in seconds")
    ] = 86_400
    qps: Annotated[
        float,
        Meta(
            gt=0,
            description="token-bucket refill in orders per second, per gateway instance (all"
            " its workers together)",
        ),
    ] = 5000.0
    burst: Annotated[
        int, Meta(ge=1, description="token-bucket capacity in orders; the bucket starts full")
    ] = 1000
    breaker_rt_ms: Annotated[
        int, Meta(ge=1, description="slow-call threshold of the circuit breaker, in milliseconds")
    ] = 800
    breaker_slow_ratio: Annotated[
        float, Meta(ge=0, le=1, description="share of slow calls above which the breaker opens")
    ] = 0.5
    breaker_min_calls: Annotated[
        int, Meta(ge=1, description="calls in a window before the breaker can open")
    ] = 5
    breaker_window_ms: Annotated[
        int, Meta(ge=1, description="the breaker's statistics window, in milliseconds")
    ] = 1000
    breaker_open_s: Annotated[
        float, Meta(gt=0, description="seconds the breaker stays open before a half-open probe")
    ] = 10.0
    client_qps: Annotated[
        float,
        Meta(
            ge=0,
            description="order creations per second per client address, per instance (a"
            " token bucket each; `429 client_rate_limited`); 0: off. A runtime rule"
            " (`/api/v1/admin/rules`): this only seeds it",
        ),
    ] = 0.0
    client_burst: Annotated[
        int, Meta(ge=0, description="capacity of each client address's bucket; 0: `client_qps`")
    ] = 0
    user_qps: Annotated[
        float, Meta(ge=0, description="as `client_qps`, per `user_id`; 0: off. A runtime rule")
    ] = 0.0
    user_burst: Annotated[
        int, Meta(ge=0, description="capacity of each user's bucket; 0: `user_qps`")
    ] = 0
    trusted_proxies: Annotated[
        str,
        Meta(
            description="comma-separated addresses or CIDRs of the proxies in front: from these"
            " peers only, `Forwarded`/`X-Forwarded-For` name the client (the right-most"
            " address that is not a trusted proxy); empty: the peer is the client",
        ),
    ] = ""
    max_quantity: Annotated[int, Meta(ge=1, description="largest `quantity` of one order")] = 100
    max_body_bytes: Annotated[
        int, Meta(ge=1, description="largest request body in bytes (`413` above)")
    ] = 4096
    client_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="seconds within which a request's head and body must arrive:"
            " `408 request_timeout` (a silent connection is closed); request heads over"
            " 32 KiB: `431 headers_too_large` (`gateway/web/protocol.py`)",
        ),
    ] = 10.0
    queue_max: Annotated[
        int,
        Meta(
            ge=1,
            description="backlog bound per SKU stream: unprocessed orders before `503 queue_full`",
        ),
    ] = 50_000
    mode_refresh_ms: Annotated[
        int,
        Meta(
            ge=1,
            le=1000,  # every worker applies a switch within one second, notice or not
            description="how often each gateway process re-reads the intake mode and the"
            " runtime rules, in milliseconds (at most 1000: the 1-s promise rests on it)",
        ),
    ] = 500
    figures_max_age_ms: Annotated[
        int,
        Meta(
            ge=0,
            le=60_000,
            description="how old the figures read from Redis for /metrics and the console may"
            " be, in milliseconds: each process reads them at most this often, in two round"
            " trips whatever the number of SKUs (0: on every read)",
        ),
    ] = 1000
    soldout_recheck_ms: Annotated[
        int,
        Meta(
            ge=1,
            description="how long a process refuses a sold-out SKU from memory before one"
            " request re-checks, in milliseconds",
        ),
    ] = 1000
    bucket_file: Annotated[
        str | None,
        Meta(
            description="file the workers of one instance share the token bucket through;"
            " unset: a local bucket with 1 worker, `/dev/shm/flashgate-<uid>-<port>.bucket`"
            " (else the temp dir) with `--workers` > 1"
        ),
    ] = None
    finalizer_batch: Annotated[
        int,
        Meta(
            ge=1,
            description="`COUNT` of each finalizer read and claim, in entries per stream"
            " (the prefetch)",
        ),
    ] = 200
    finalizer_block_ms: Annotated[
        int,
        Meta(
            ge=1,
            description="`BLOCK` of the finalizer's read in milliseconds; its Redis deadline"
            " is the Redis timeout plus this",
        ),
    ] = 1000
    finalizer_claim_idle_ms: Annotated[
        int,
        Meta(
            ge=0,
            description="milliseconds an entry stays pending (its finalizer died) before"
            " another finalizer claims it (`XAUTOCLAIM` min-idle)",
        ),
    ] = 30_000
    draw_batch: Annotated[
        int, Meta(ge=1, le=10_000, description="pre-queued orders one `draw_decide.lua` decides")
    ] = 100
    finalizer_max_deliveries: Annotated[
        int,
        Meta(
            ge=1,
            description="deliveries after which an entry the script refuses goes to the"
            " dead-letter stream",
        ),
    ] = 5
    sweep_interval_ms: Annotated[
        int, Meta(ge=1, description="pause between sweeps of every SKU, in milliseconds")
    ] = 1000
    sweep_batch: Annotated[int, Meta(ge=1, description="holds released per `sweep.lua` call")] = 100
    # the relay: every final event to the order system (`flashgate relay`)
    relay_url: Annotated[
        str | None,
        Meta(
            description="the relay's target: `http://`/`https://` (a signed webhook) or"
            " `amqp://`/`amqps://` (RabbitMQ); unset: no relay"
        ),
    ] = dataclasses.field(default=None, repr=False)  # may carry the broker's password
    relay_secret: Annotated[
        str | None,
        Meta(
            description="webhook signing secret, `whsec_` + base64 of 24 to 64 bytes (Standard"
            " Webhooks); required for a webhook target"
        ),
    ] = dataclasses.field(default=None, repr=False)
    relay_queue: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=255,
            description="RabbitMQ queue, declared durable with `x-max-length` ="
            " `FLASHGATE_QUEUE_MAX`, `x-overflow: reject-publish` and a dead-letter exchange",
        ),
    ] = "queue_order_create"
    relay_prefetch: Annotated[
        int, Meta(ge=1, le=10_000, description="events the relay reads per batch")
    ] = 200
    relay_max_attempts: Annotated[
        int,
        Meta(
            ge=1,
            description="refusals (a non-2xx answer, a nack, a timeout after sending) after which"
            " an event goes to the relay's dead letters; an unreachable target uses up none",
        ),
    ] = 10
    busy_message: Annotated[str, Meta(description="shopper text of overload answers")] = (
        DEFAULT_BUSY_MESSAGE
    )
    data_dir: Annotated[str, Meta(description="embedded server's data directory")] = ".flashgate"
    host: Annotated[str, Meta(description="address the gateway listens on")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="TCP port the gateway listens on")] = 8080
    workers: Annotated[int, Meta(ge=1, description="HTTP worker processes")] = 1
    access_log: Annotated[
        bool,
        Meta(
            description="one log line per answer on `flashgate.access`: `request_id` (the"
            " client's `X-Request-Id` when it is an id, else a new one), `method`, `route`"
            " (the path template), `status`, `code`, `duration_ms`, `client`, `order_id` when"
            " there is one; off by default (a line per request costs about as much as the"
            " request)"
        ),
    ] = False
    fast_path: Annotated[
        bool, Meta(description="order creation answered in the HTTP protocol, not via ASGI")
    ] = True
    log_level: Annotated[str, Meta(description="uvicorn's log level")] = "info"
    log_format: Annotated[
        Literal["json", "text"],
        Meta(
            description="`json`: one object per line from every process (`ts`, `level`,"
            " `logger`, `pid`, `msg` and the line's own fields such as `request_id`,"
            " `order_id`, `sku_id`; `exc` for a traceback), uvicorn's lines included; `text`"
            " for people (`gateway/telemetry/logs.py`). No line carries a token, a secret, a"
            " body or a header other than `X-Request-Id` and `X-Operator`"
        ),
    ] = "json"

    def __post_init__(self) -> None:
        try:
            msgspec.convert(self, _Values, from_attributes=True)
        except msgspec.ValidationError as exc:
            raise _refused(exc, {s.name: getattr(self, s.name) for s in SETTINGS}) from None
        for problem in problems(self):
            raise ConfigError(problem)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
    ) -> Settings:
        """Read every setting from `environ` (default os.environ), then `.env`, then defaults."""
        env = dict(read_dotenv(dotenv)) if dotenv else {}
        env.update(os.environ if environ is None else environ)
        raw = {s.name: env[s.env] for s in SETTINGS if env.get(s.env)}
        try:
            values = msgspec.convert(
                {name: _BY_NAME[name].prepare(text) for name, text in raw.items()},
                _Values,
                strict=False,
            )
        except msgspec.ValidationError as exc:
            raise _refused(exc, raw) from None
        return cls(**msgspec.structs.asdict(values))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` in a child process give these settings."""
        out: dict[str, str] = {}
        for s in SETTINGS:
            if (value := getattr(self, s.name)) is not None:
                out[s.env] = text_of(value)
        return out


def env_name(field_name: str) -> str:
    return _BY_NAME[field_name].env


def _refused(exc: msgspec.ValidationError, given: Mapping[str, object]) -> ConfigError:
    return ConfigError(refusal(str(exc), _BY_NAME, given))


_HINTS = get_type_hints(Settings, include_extras=True)
SETTINGS = tuple(declare(f, _HINTS[f.name]) for f in dataclasses.fields(Settings))
_BY_NAME = {s.name: s for s in SETTINGS}
# the fields alone, for msgspec to check and convert (Settings itself would recurse)
_Values = msgspec.defstruct(
    "SettingsValues", [(s.name, _HINTS[s.name], s.default) for s in SETTINGS], frozen=True
)


def settings_table() -> str:
    """`docs/reference/settings.md`, from the declaration above."""
    return reference_page(SETTINGS)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m gateway.settings --markdown > docs/reference/settings.md")
    sys.stdout.write(settings_table())
