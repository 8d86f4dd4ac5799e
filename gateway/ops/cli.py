"""`flashgate serve | gateway | finalizer | sweeper | audit`: the console script."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import fields

from gateway import __version__
from gateway.errors import GatewayError
from gateway.ops.embedded import EmbeddedError
from gateway.ops.launch import local_cluster, resolve_redis, run_gateway, run_role
from gateway.ops.supervisor import Supervisor
from gateway.settings import ConfigError, Settings, env_name
from gateway.telemetry import logs
from gateway.transport.replies import REDIS_FAILURES

_HELP = {
    "redis_url": "Redis/Valkey URL; unset: the embedded server",
    "redis_cluster": "REDIS_URL names a node of a Redis Cluster",
    "redis_timeout_ms": "deadline of one Redis call (ms)",
    "redis_client": "the order path's client: mux (one pipelined connection) or pool",
    "hold_ttl_s": "how long an unpaid hold keeps its stock (s)",
    "idempotency_ttl_s": "how long an accepted answer is replayed (s)",
    "workers": "HTTP worker processes",
    "data_dir": "directory of the embedded server's data",
    "access_log": "one log line per request (request id, route, status, order id); costly",
    "qps": "token bucket refill per second, per gateway instance",
    "burst": "token bucket capacity",
    "queue_max": "most unprocessed orders one SKU's stream may hold",
    "mode_refresh_ms": "how often each worker re-reads the intake mode (ms)",
    "soldout_recheck_ms": "how long a sold-out SKU is refused from memory (ms)",
    "bucket_file": "token-bucket file shared by the workers (default: per port, on tmpfs)",
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = Settings.__dataclass_fields__[field.name].default
        help_text = f"{_HELP.get(field.name, '')} [env {env_name(field.name)}, default {default!r}]"
        if str(field.type) == "bool":
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar="V", help=help_text)


def _settings(args: argparse.Namespace) -> Settings:
    """env > .env > default, with command-line flags above all."""
    overrides = {
        env_name(f.name): str(int(v) if isinstance(v, bool) else v)
        for f in fields(Settings)
        if (v := getattr(args, f.name, None)) is not None
    }
    return Settings.from_env({**os.environ, **overrides})


def _read(args: argparse.Namespace, settings: Settings) -> int:
    """`dead`, `status` and `audit`: read what Redis holds (their modules loaded only here)."""
    if args.command in ("dead", "status"):
        from gateway.ops import status

        if args.command == "dead":
            return asyncio.run(status.show_dead(settings, args.sku, args.limit))
        return asyncio.run(status.show_status(settings, args.watch, args.count))
    from gateway.ops.audit import audit

    return asyncio.run(audit(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashgate", description="Flash-sale intake gateway.")
    parser.add_argument("--version", action="version", version=f"flashgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "everything one machine needs, on the embedded server unless REDIS_URL is set"),
        ("gateway", "only the HTTP gateway"),
        ("finalizer", "only a finalizer (several share one consumer group)"),
        ("sweeper", "only the expired-hold sweeper (safe to run more than one)"),
        ("audit", "check the inventory invariants of every SKU"),
        ("status", "mode, stock, backlog and rates of every SKU, in the terminal"),
        ("dead", "list the newest dead letters of every SKU (read only)"),
    ):
        command = sub.add_parser(name, help=text, description=text)
        if name == "status":
            command.add_argument(
                "--watch", type=float, default=0.0, metavar="S",
                help="print the table every S seconds until interrupted (default: once)",
            )  # fmt: skip
            command.add_argument("--count", type=int, default=None, help="stop after N tables")
        if name == "dead":
            command.add_argument("--sku", action="append", help="only this SKU (repeatable)")
            command.add_argument("--limit", type=int, default=20, help="per SKU (default 20)")
        _add_settings_flags(command)
    text = "a throwaway local Redis Cluster (embedded binary) for trying cluster mode"
    local = sub.add_parser("local-cluster", help=text, description=text)
    local.add_argument("--primaries", type=int, default=3, help="primaries (default 3)")
    local.add_argument("--replicas", type=int, default=0, help="replicas per primary (default 0)")
    local.add_argument("--first-port", type=int, default=7000, help="first node's port (7000)")
    local.add_argument(
        "--dir", default=".flashgate-cluster", help="its files, wiped at start (default "
        ".flashgate-cluster)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "local-cluster":
        return local_cluster(args.dir, args.primaries, args.replicas, args.first_port)
    logs.configure("text")  # until the settings say which
    try:
        settings = _settings(args)
        logs.configure(settings.log_format)
        if args.command == "serve":
            return Supervisor(settings).run()
        if args.command == "gateway":
            return run_gateway(settings)
        if args.command in ("finalizer", "sweeper"):
            return asyncio.run(run_role(resolve_redis(settings), args.command))
        return _read(args, resolve_redis(settings))
    except (ConfigError, EmbeddedError) as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return 2
    except (GatewayError, *REDIS_FAILURES) as exc:  # audit, status, dead: Redis out of reach
        print(f"flashgate: Redis is not answering ({type(exc).__name__})", file=sys.stderr)
        return 1
