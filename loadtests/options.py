"""The command line of `python -m loadtests.run`: the scenario, the load and the catalogue,
the gateway and the scalpers."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUSTFILES = {
    "spike": LOCUSTFILE,
    "queue": Path(__file__).with_name("queue_locustfile.py"),
    "prequeue": Path(__file__).with_name("prequeue_locustfile.py"),
}
REPORTS = Path(__file__).with_name("reports")  # in .gitignore


def parse_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=description)
    scenario_options(p)
    load_options(p)
    gateway_options(p)
    return p.parse_args(argv)


def scenario_options(p: argparse.ArgumentParser) -> None:
    """Which run: the scenario, the fair start's timing and mode, the finalizer's pace."""
    p.add_argument(
        "--scenario", choices=sorted(LOCUSTFILES), default="spike",
        help="spike: the 0:00 spike (default); queue: shoppers in a QUEUE_ONLY line; prequeue:"
        " a fair start, shoppers before and after it",
    )  # fmt: skip
    p.add_argument(
        "--start-in", type=float, default=5, metavar="SECONDS",
        help="prequeue: the hot SKU's sale starts this long after Locust starts (default 5)",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=("QUEUE_ONLY", "NORMAL"), default="QUEUE_ONLY",
        help="prequeue: the intake mode of the run (default QUEUE_ONLY)",
    )  # fmt: skip
    p.add_argument(
        "--finalizer-share", type=float, default=1.0, metavar="SHARE",
        help="a slow back end: the finalizer runs this share of each 100 ms (default 1: always)",
    )  # fmt: skip


def load_options(p: argparse.ArgumentParser) -> None:
    """The load and the catalogue: users over time, where the reports go, Locust and gateway
    processes, the SKUs' stock and limits, the shoppers' habits, the operator's flips."""
    p.add_argument("--users", type=int, default=300, help="peak users (default 300)")
    p.add_argument("--spawn-seconds", type=float, default=2, help="0 to peak in (default 2)")
    p.add_argument("--hold-seconds", type=float, default=30, help="peak held for (default 30)")
    p.add_argument("--tail-seconds", type=float, default=10, help="tail after it (default 10)")
    p.add_argument("--tail-users", type=int, help="users in the tail (default users/10)")
    p.add_argument("--out", default=str(REPORTS), help="reports and data (%(default)s)")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--processes", type=int, default=1, help="Locust processes (default 1)")
    p.add_argument("--stock", type=int, default=100, help="stock of the hot SKU (default 100)")
    p.add_argument(
        "--cluster", type=int, default=0, metavar="N",
        help="run on a local Redis Cluster of N primaries (default 0: the embedded server)",
    )  # fmt: skip
    p.add_argument("--hot-buckets", type=int, default=1, help="stock buckets of the hot SKU (1)")
    p.add_argument("--hot-limit", type=int, default=1, help="per-user limit, hot SKU (default 1)")
    p.add_argument("--skus", type=int, default=3, help="ordinary SKUs (default 3)")
    p.add_argument("--sku-stock", type=int, default=2000, help="stock of each (default 2000)")
    p.add_argument("--sku-limit", type=int, default=2, help="their per-user limit (default 2)")
    p.add_argument("--pay-share", type=float, default=0.3, help="share of orders paid (0.3)")
    p.add_argument("--think-seconds", type=float, default=0.5, help="shoppers' pause (0.5)")
    p.add_argument("--switch-every", type=float, default=4, help="QUEUE_ONLY flip period (4 s)")
    p.add_argument("--queue-only-seconds", type=float, default=1.5, help="QUEUE_ONLY for (1.5)")


def gateway_options(p: argparse.ArgumentParser) -> None:
    """The gateway's port, secrets and extra flags, strictness, the scalpers and their limits,
    the drain, Locust's output."""
    p.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument("--admin-token", default=os.environ.get("FLASHGATE_ADMIN_TOKEN"))
    p.add_argument("--payment-secret", default=os.environ.get("FLASHGATE_PAYMENT_SECRET"))
    p.add_argument(
        "--serve-opt",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra `flashgate serve` flag, e.g. --serve-opt=--qps=2000 (repeatable)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="a sold-out memo answering 409 before 404/422 is a failure (README)",
    )
    p.add_argument(
        "--scalpers", type=int, default=0, metavar="N",
        help="N scalpers of each kind (one user many keys, one address many users) beside the"
        " shoppers, every one behind a trusted proxy; the limits below set as runtime rules",
    )  # fmt: skip
    p.add_argument("--user-qps", type=float, default=5, help="scalper runs: user_qps (5)")
    p.add_argument("--user-burst", type=int, default=10, help="scalper runs: user_burst (10)")
    p.add_argument("--client-qps", type=float, default=5, help="scalper runs: client_qps (5)")
    p.add_argument("--client-burst", type=int, default=10, help="scalper runs: client_burst (10)")
    p.add_argument("--drain-timeout", type=float, default=120, help="seconds (default 120)")
    p.add_argument("--verbose", action="store_true", help="show Locust's output as it runs")
