"""`flashgate serve | gateway | finalizer | sweeper | relay | audit | status | dead |
verify-draw`: the console script."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.errors import GatewayError
from gateway.ops.embedded import EmbeddedError
from gateway.ops.launch import local_cluster, resolve_redis, run_gateway, run_role
from gateway.ops.supervisor import Supervisor
from gateway.setting import text_of
from gateway.settings import SETTINGS, ConfigError, Settings
from gateway.telemetry import logs
from gateway.transport.replies import REDIS_FAILURES


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting (`hold_ttl_s`: `--hold-ttl-s`), its help from the declaration."""
    for s in SETTINGS:
        about = f"{s.description} [env {s.env}: {s.accepts()}; default {s.default_text}]"
        about = about.replace("`", "").replace("%", "%%")  # argparse formats help with %
        if s.kind is bool:
            parser.add_argument(
                s.flag,
                dest=s.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=about,
            )
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar="V", help=about)


def _settings(args: argparse.Namespace) -> Settings:
    """env > .env > default, with command-line flags above all."""
    overrides = {
        s.env: text_of(v) for s in SETTINGS if (v := getattr(args, s.name, None)) is not None
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


def _verify_draw(args: argparse.Namespace, settings: Settings) -> int:
    """`verify-draw`: from a saved answer, a gateway, or Redis (the default)."""
    from gateway.ops import verify

    try:
        if args.file:
            return verify.from_file(Path(args.file), args.commitment)
        if args.url:
            return verify.from_url(settings, args.sku, args.url)
        return asyncio.run(verify.from_redis(resolve_redis(settings), args.sku))
    except verify.Unreadable as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return 2


def _add_verify_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("sku", help="the SKU whose draw to check")
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--url", help="read the draw from this gateway (FLASHGATE_ADMIN_TOKEN) instead of Redis"
    )
    source.add_argument(
        "--file", help="check a saved answer of GET /api/v1/admin/skus/{id}/draw instead"
    )
    command.add_argument(
        "--commitment", help="with --file: the draw_commitment published before the sale"
    )


def _add_relay_arguments(command: argparse.ArgumentParser) -> None:
    once = command.add_mutually_exclusive_group()
    once.add_argument(
        "--replay-dead", action="store_true",
        help="send this target's dead letters again (same event ids), then exit "
        "instead of running a relay",
    )  # fmt: skip
    once.add_argument(
        "--forget", action="store_true",
        help="retire this target (or --group): destroy its consumer group on every events "
        "stream, so they are trimmed again, and drop its lag figures; its dead letters stay. "
        "Refused while one of its relays reported within 30 s",
    )  # fmt: skip
    command.add_argument(
        "--group", metavar="G",
        help="with --forget: the group to retire, as flashgate status names it (default: "
        "FLASHGATE_RELAY_URL's)",
    )  # fmt: skip
    command.add_argument(
        "--force", action="store_true",
        help="with --forget: even if one of its relays reported within 30 s",
    )  # fmt: skip
    command.add_argument(
        "--consumer", metavar="NAME",
        help="this relay's name in its consumer group (default: host, pid and a random"
        " part); a relay started again under its old name resumes the entries it held"
        " at once. Never give two live relays one name",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    """Every command with its own arguments and, but for local-cluster, every setting's flag."""
    parser = argparse.ArgumentParser(prog="flashgate", description="Flash-sale intake gateway.")
    parser.add_argument("--version", action="version", version=f"flashgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "everything one machine needs, on the embedded server unless REDIS_URL is set"),
        ("gateway", "only the HTTP gateway"),
        ("finalizer", "only a finalizer (several share one consumer group)"),
        ("sweeper", "only the expired-hold sweeper (safe to run more than one)"),
        ("relay", "only a relay: final events to FLASHGATE_RELAY_URL (several share the work)"),
        ("audit", "check the inventory invariants of every SKU"),
        ("status", "mode, stock, backlog and rates of every SKU, in the terminal"),
        ("dead", "list the newest dead letters of every SKU (read only)"),
        ("verify-draw", "recompute a fair start's draw: every rank and the commitment"),
    ):
        command = sub.add_parser(name, help=text, description=text)
        if name == "status":
            command.add_argument(
                "--watch", type=float, default=0.0, metavar="S",
                help="print the table every S seconds until interrupted (default: once)",
            )  # fmt: skip
            command.add_argument("--count", type=int, default=None, help="stop after N tables")
        if name == "finalizer":
            command.add_argument(
                "--replay-dead", action="store_true",
                help="put the dead letters back on their order streams (after a repair), "
                "then exit instead of running a finalizer",
            )  # fmt: skip
        if name == "relay":
            _add_relay_arguments(command)
        if name in ("dead", "finalizer", "relay"):
            command.add_argument("--sku", action="append", help="only this SKU (repeatable)")
        if name == "dead":
            command.add_argument("--limit", type=int, default=20, help="per SKU (default 20)")
        if name == "verify-draw":
            _add_verify_arguments(command)
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
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "relay" and not args.forget and (args.group or args.force):
        parser.error("--group and --force go with --forget")
    if args.command == "relay" and args.forget and args.sku:
        parser.error("--forget retires the group on every SKU: no --sku")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
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
        if args.command in ("finalizer", "relay") and args.replay_dead:
            from gateway.ops import status

            replay = status.replay_dead if args.command == "finalizer" else status.replay_relay
            return asyncio.run(replay(resolve_redis(settings), args.sku))
        if args.command == "relay" and args.forget:
            from gateway.ops import status

            return asyncio.run(
                status.forget_relay(resolve_redis(settings), args.group, force=args.force)
            )
        if args.command in ("finalizer", "sweeper", "relay"):
            name = getattr(args, "consumer", None)
            return asyncio.run(run_role(resolve_redis(settings), args.command, name=name))
        if args.command == "verify-draw":
            return _verify_draw(args, settings)
        return _read(args, resolve_redis(settings))
    except (ConfigError, EmbeddedError) as exc:
        print(f"flashgate: {exc}", file=sys.stderr)
        return 2
    except (GatewayError, *REDIS_FAILURES) as exc:  # audit, status, dead: Redis out of reach
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return 1  # the reader of the output went away (`flashgate status --watch 2 | head`)
        print(f"flashgate: Redis is not answering ({type(exc).__name__})", file=sys.stderr)
        return 1


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader closed it: then a BrokenPipeError was ours, not the
    Redis connection's. Stdout is pointed at /dev/null so that the exit flush stays quiet."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return True
