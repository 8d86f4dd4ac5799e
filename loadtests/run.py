"""`python -m loadtests.run`: one headless load test from nothing, checked.

Starts `flashgate serve` (embedded server, fresh data directory, free port), configures the
SKUs through the admin API, runs Locust headless with the spike shape (`locustfile.py`; with
`--scenario queue`, shoppers in a QUEUE_ONLY line, `queue_locustfile.py`, and a report of their
poll volume and ETA error; with `--scenario prequeue`, a fair start: the hot SKU pre-queues
until its start a few seconds in, `prequeue_locustfile.py`, and the report adds the draw's
fairness and `flashgate verify-draw`), lets
the finalizers drain, runs `flashgate audit`, reads the figures from Redis and prints the
oversold, duplicate, lost and unsettled counts. Exit code 0 only when all of them are 0, the
audit passes and Locust saw no unexpected answer. Whatever happens (Ctrl-C, SIGTERM, an error)
everything it started is stopped, and it checks that no process of the run is left.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import httpx
import redis

from gateway.ops.embedded import free_port
from gateway.ops.localcluster import LocalCluster
from loadtests import fairness, line as queue_line
from loadtests.procs import Locust, Serve, Throttle, Tracker, child_running
from loadtests.report import LocustStats, read_locust, report_files
from loadtests.verify import Findings, check_records, check_skus, drain, read_records

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUSTFILES = {
    "spike": LOCUSTFILE,
    "queue": Path(__file__).with_name("queue_locustfile.py"),
    "prequeue": Path(__file__).with_name("prequeue_locustfile.py"),
}
PREQUEUE_S = 3600  # the fair start's window: open from the SKU's configuration
REPORTS = Path(__file__).with_name("reports")  # in .gitignore
PROMOTION = "promo-load"
HOT = "hot"
OUTPUTS = ("accepted.jsonl", "line.jsonl", "serve.log", "locust.log", "audit.txt", "summary.json")
LATENCY = "latency.json"  # per Locust process: latency.json.<pid>


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
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
    return p.parse_args(argv)


def _interrupted(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def prepare(out: Path) -> None:
    """A fresh data directory and no report of an earlier run."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for path in out.glob(LATENCY + ".*"):
        path.unlink()
    for path in report_files(out / "locust", out / "report.html"):
        path.unlink(missing_ok=True)


def configure(
    base: str, token: str, skus: dict[str, tuple[int, int]], hot_buckets: int = 1
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    for sku, (stock, limit) in skus.items():
        body = {"promotion_id": PROMOTION, "stock": stock, "per_user_limit": limit}
        if sku == HOT and hot_buckets > 1:
            body["buckets"] = hot_buckets
        r = httpx.put(f"{base}/api/v1/admin/skus/{sku}", json=body, headers=headers, timeout=10)
        if r.status_code != 201:
            raise RuntimeError(f"PUT SKU {sku}: {r.status_code} {r.text}")


def locust_argv(args: argparse.Namespace, host: str, out: Path) -> list[str]:
    argv = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILES[args.scenario]), "--headless"),
        *("--host", host, "--csv", str(out / "locust"), "--html", str(out / "report.html")),
        *("--only-summary", "--stop-timeout", "5", "--exit-code-on-error", "1"),
    ]
    if args.processes > 1:
        argv += ["--processes", str(args.processes)]
    return argv


def locust_env(args: argparse.Namespace, env: dict[str, str], out: Path, skus: list[str]) -> dict:
    tail_users = args.tail_users if args.tail_users is not None else max(1, args.users // 10)
    return {
        **env,
        "FLASHGATE_LT_HOT_SKU": HOT,
        "FLASHGATE_LT_SKUS": ",".join(skus),
        "FLASHGATE_LT_PROMOTION": PROMOTION,
        "FLASHGATE_LT_ACCEPTED": str(out / "accepted.jsonl"),
        "FLASHGATE_LT_LINE": str(out / "line.jsonl"),
        "FLASHGATE_LT_USERS": str(args.users),
        "FLASHGATE_LT_SPAWN_S": str(args.spawn_seconds),
        "FLASHGATE_LT_HOLD_S": str(args.hold_seconds),
        "FLASHGATE_LT_TAIL_S": str(args.tail_seconds),
        "FLASHGATE_LT_TAIL_USERS": str(tail_users),
        "FLASHGATE_LT_PAY_SHARE": str(args.pay_share),
        "FLASHGATE_LT_SWITCH_EVERY_S": str(args.switch_every),
        "FLASHGATE_LT_QUEUE_ONLY_S": str(args.queue_only_seconds),
        "FLASHGATE_LT_THINK_S": str(args.think_seconds),
        "FLASHGATE_LT_STRICT": "1" if args.strict else "0",
        "FLASHGATE_LT_SCALPERS": str(args.scalpers),
        "FLASHGATE_LT_LATENCY": str(out / LATENCY),
    }


def set_limits(base: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    """The scalper run's per-user and per-address limits, through the rules API."""
    rules = {
        "user_qps": args.user_qps,
        "user_burst": args.user_burst,
        "client_qps": args.client_qps,
        "client_burst": args.client_burst,
    }
    headers = {"Authorization": f"Bearer {token}", "X-Operator": "loadtest"}
    r = httpx.put(f"{base}/api/v1/admin/rules", json=rules, headers=headers, timeout=10)
    if r.status_code != 200:
        raise RuntimeError(f"PUT rules: {r.status_code} {r.text}")
    return rules


def percentile(histogram: dict[int, int], share: float) -> int | None:
    """The smallest whole ms at or under which `share` of the requests were answered."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= share * total:
            return ms
    return max(histogram)


def groups(out: Path, stats: LocustStats) -> dict[str, Any]:
    """Honest shoppers' and scalpers' creates: how many, how they were answered, p50/p99."""
    merged: dict[str, dict[int, int]] = {"honest": {}, "scalper": {}}
    for path in out.glob(LATENCY + ".*"):
        for group, hist in json.loads(path.read_text(encoding="utf-8")).items():
            for ms, n in hist.items():
                merged[group][int(ms)] = merged[group].get(int(ms), 0) + n
    found: dict[str, Any] = {}
    for group, hist in merged.items():
        answers: dict[str, int] = {}
        for name, (count, _) in stats.by_name.items():
            if not name.startswith("POST create ") or "[" not in name:
                continue
            if name.startswith("POST create scalper") != (group == "scalper"):
                continue
            answer = name.rsplit("[", 1)[1].rstrip("]")
            answers[answer] = answers.get(answer, 0) + count
        found[group] = {
            "creates": sum(answers.values()),
            "accepted": sum(n for a, n in answers.items() if a.startswith("202")),
            "client_rate_limited": answers.get("429 client_rate_limited", 0),
            "p50_ms": percentile(hist, 0.5),
            "p99_ms": percentile(hist, 0.99),
            "answers": dict(sorted(answers.items())),
        }
    return found


def print_groups(found: dict[str, Any]) -> None:
    """One line per group that sent creates (no scalper line in a run without scalpers)."""
    for group, g in found.items():
        if not g["creates"]:
            continue
        print(
            f"{group} creates: {g['creates']}, accepted {g['accepted']}, 429"
            f" client_rate_limited {g['client_rate_limited']}; p50 {g['p50_ms']} ms,"
            f" p99 {g['p99_ms']} ms"
        )


def print_locust(stats: LocustStats, seconds: float) -> None:
    print(
        f"requests: {stats.requests} in {seconds:.1f} s, {stats.rps:.0f} requests/s; "
        f"median {stats.median_ms:.0f} ms, p95 {stats.p95_ms:.0f} ms, p99 {stats.p99_ms:.0f} ms"
    )
    print("by status: " + ", ".join(f"{k}: {n}" for k, n in sorted(stats.by_status.items())))
    print("by answer:")
    for answer, n in sorted(stats.by_answer.items()):
        print(f"  {answer:<32} {n:>9}")
    print(f"unexpected answers (Locust failures): {stats.failures}")
    for name, error, n in stats.failure_rows[:15]:
        print(f"  {n:>6} x {name}: {error[:160]}")
    print(f"errors in the locustfile (Locust exceptions): {stats.exceptions}")
    for message, n in stats.exception_rows[:5]:
        print(f"  {n:>6} x {message[:160]}")


def print_findings(f: Findings) -> None:
    print("SKU figures after the drain:")
    print(f"  {'sku':<8} {'stock':>7} {'available':>9} {'held':>7} {'sold':>7} {'backlog':>7}")
    for sku, fig in f.skus.items():
        print(
            f"  {sku:<8} {fig['stock']:>7} {fig['available']:>9} {fig['held']:>7} "
            f"{fig['sold']:>7} {fig['backlog']:>7}"
        )
    statuses = ", ".join(f"{k}: {n}" for k, n in sorted(f.statuses.items()))
    print(f"order records in Redis: {f.records} ({statuses})")
    print(
        f"recorded 202 answers: {f.recorded} ({f.orders} orders, {f.replays} replays), "
        f"recorded payments: {f.payments}"
    )
    for name, items in (
        ("oversold", f.oversold),
        ("duplicate", f.duplicate),
        ("lost", f.lost),
        ("unsettled", f.unsettled),
    ):
        print(f"{name}: {len(items)}")
        for subject, reasons in list(items.items())[:10]:
            print(f"  {subject}: {'; '.join(reasons)[:200]}")


class LoadRun:
    """One run: what it starts, in order, and how it stops it all."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.token = args.admin_token or secrets.token_urlsafe(18)
        self.env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.env.update(
            FLASHGATE_ADMIN_TOKEN=self.token,
            FLASHGATE_PAYMENT_SECRET=args.payment_secret or secrets.token_urlsafe(18),
        )
        if args.scalpers:  # Locust, on 127.0.0.1, is the shoppers' trusted proxy
            self.env.update(FLASHGATE_TRUSTED_PROXIES="127.0.0.1")
        self.skus = [f"std-{i}" for i in range(1, args.skus + 1)]
        self.catalogue = {
            HOT: (args.stock, args.hot_limit),
            **{s: (args.sku_stock, args.sku_limit) for s in self.skus},
        }
        self.cluster: LocalCluster | None = None
        if args.cluster:
            self.cluster = LocalCluster(out / "cluster", primaries=args.cluster)
            self.env.update(REDIS_URL=self.cluster.start(), FLASHGATE_REDIS_CLUSTER="1")
        port = args.port or free_port()
        self.serve = Serve(
            out, port=port, workers=args.workers, env=self.env, options=args.serve_opt
        )
        self.locust = Locust(
            locust_argv(args, self.serve.base, out),
            locust_env(args, self.env, out, self.skus),
            out / "locust.log",
            args.verbose,
        )
        self.tracker = Tracker()
        self.throttled: Throttle | None = None
        self.summary: dict[str, Any] = {"ok": False}

    def scan(self) -> None:
        for proc in (self.serve.proc, self.locust.proc):
            self.tracker.scan(proc.pid if proc else None)

    def execute(self) -> int:
        args, out, serve = self.args, self.out, self.serve
        span = args.spawn_seconds + args.hold_seconds + args.tail_seconds
        print(
            f"load: 0 -> {args.users} users in {args.spawn_seconds:g} s, held "
            f"{args.hold_seconds:g} s, tail {args.tail_seconds:g} s; gateway workers "
            f"{args.workers}, Locust processes {args.processes}"
        )
        serve.start(self.scan)
        self.scan()
        configure(serve.base, self.token, self.catalogue, args.hot_buckets)
        if args.scalpers:
            limits = set_limits(serve.base, self.token, args)
            print(f"scalpers: {args.scalpers} of each kind; limits {limits}")
        print(f"serve: {serve.base}, data in {serve.data_dir}, log {serve.log_path}")
        print(
            f"SKUs: {HOT} stock {args.stock} limit {args.hot_limit}; {', '.join(self.skus)} "
            f"stock {args.sku_stock} limit {args.sku_limit}; promotion {PROMOTION}"
        )
        if args.scenario == "queue" or (args.scenario, args.mode) == ("prequeue", "QUEUE_ONLY"):
            self.switch("QUEUE_ONLY")
            time.sleep(1.2)  # every worker applies a switch within a second
        if args.finalizer_share < 1:
            self.throttle()
        if args.scenario == "prequeue":
            self.fair_start()
        started = time.monotonic()
        self.locust.start()
        locust_rc = self.locust.wait(span + 120, self.scan)
        if self.throttled is not None:
            self.throttled.stop()  # the drain below runs at full speed
        seconds = time.monotonic() - started
        self.scan()
        print(f"locust: exit code {locust_rc} after {seconds:.1f} s, log {out / 'locust.log'}")
        if serve.proc is not None and serve.proc.poll() is not None:
            raise RuntimeError(
                f"flashgate serve exited during the run (code {serve.proc.returncode}); "
                f"the end of {serve.log_path}:\n{serve.log_tail()}"
            )
        self.switch("NORMAL")  # the operator may have been stopped in QUEUE_ONLY
        findings = Findings()
        client: Any
        if self.cluster is not None:
            client = redis.RedisCluster.from_url(self.cluster.url, decode_responses=True)
        else:
            client = redis.Redis.from_url(serve.redis_url(), decode_responses=True)
        try:
            waited = drain(client, self.catalogue, args.drain_timeout)
            if waited is None:
                print(f"drain: NOT done after {args.drain_timeout:g} s")
            else:
                print(f"drain: done in {waited:.1f} s")
            audit_rc = self.audit()
            check_skus(client, self.catalogue, findings)
            orders, payments = read_records(out / "accepted.jsonl", findings)
            check_records(client, serve.base, orders, payments, findings)
            if args.scenario == "prequeue":
                accepted = {r["order_id"] for r in orders if r.get("sku_id") == HOT}
                fair = fairness.check(client, HOT, args.stock, accepted)
        finally:
            client.close()

        stats = read_locust(out / "locust")
        print_locust(stats, seconds)
        found = groups(out, stats)
        print_groups(found)
        print_findings(findings)
        fair_ok = True
        if args.scenario in ("queue", "prequeue"):
            metrics = httpx.get(f"{serve.base}/metrics", timeout=10).text
            self.summary["line"] = report = {
                "shoppers": queue_line.shoppers_side(out / "line.jsonl", seconds),
                "finalizers": queue_line.finalizers_side(metrics),
            }
            queue_line.print_line(report)
        if args.scenario == "prequeue":
            fair_ok = self.report_fair_start(fair, fairness.draw_metrics(metrics, HOT), seconds)
        counts = findings.counts()
        ok = (
            fair_ok
            and not any(counts.values())
            and (audit_rc, locust_rc, stats.failures, stats.exceptions) == (0, 0, 0, 0)
            and waited is not None
            and stats.requests > 0
        )
        reports = report_files(out / "locust", out / "report.html")
        self.summary.update(
            counts,
            ok=ok,
            requests=stats.requests,
            requests_per_s=round(stats.rps, 1),
            failures=stats.failures,
            by_status=dict(stats.by_status),
            by_answer=dict(stats.by_answer),
            failure_rows=stats.failure_rows[:50],
            exceptions=stats.exceptions,
            locust_exit_code=locust_rc,
            audit_exit_code=audit_rc,
            drained_s=waited,
            recorded=findings.recorded,
            orders=findings.orders,
            replays=findings.replays,
            payments=findings.payments,
            statuses=dict(findings.statuses),
            skus=findings.skus,
            groups=found,
            reports=[str(p) for p in reports],
        )
        print("reports: " + ", ".join(str(p) for p in reports))
        return 0 if ok else 1

    def fair_start(self) -> None:
        """The hot SKU's fair start: pre-queue open now, the sale `--start-in` seconds on."""
        starts_at = int(time.time() + self.args.start_in) + 1
        body = {"promotion_id": PROMOTION, "stock": self.args.stock,
                "per_user_limit": self.args.hot_limit, "starts_at": starts_at,
                "prequeue_s": PREQUEUE_S}  # fmt: skip
        r = httpx.put(
            f"{self.serve.base}/api/v1/admin/skus/{HOT}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        if r.status_code != 200 or not r.json().get("draw_commitment"):
            raise RuntimeError(f"PUT fair start of {HOT}: {r.status_code} {r.text}")
        self.summary["draw_commitment"] = r.json()["draw_commitment"]
        print(f"fair start: {HOT} pre-queues now, starts at {starts_at} ({self.args.mode})")

    def report_fair_start(
        self, fair: dict[str, Any], drawn: dict[str, Any], seconds: float
    ) -> bool:
        """Print and keep the fair start's report; True when it is fair, verified and counted
        in /metrics as it happened."""
        argv = [sys.executable, "-m", "gateway", "verify-draw", HOT,
                "--data-dir", str(self.serve.data_dir)]  # fmt: skip
        verify = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        fairness.print_fairness(fair, drawn, verify.returncode, verify.stdout + verify.stderr)
        path = self.out / "line.jsonl"
        self.summary["line"].update(
            prequeued=queue_line.shoppers_side(path, seconds, prequeued=True),
            after_start=queue_line.shoppers_side(path, seconds, prequeued=False),
        )
        for side in ("prequeued", "after_start"):
            s = self.summary["line"][side]
            print(f"  {side}: {s['orders']} orders, {s['reads']} reads"
                  f" ({s['reads_per_order_mean']} per order); wait p50 {s['wait_s_p50']} s,"
                  f" p90 {s['wait_s_p90']} s; |ETA error| p50 {s['eta_abs_error_s_p50']} s,"
                  f" p90 {s['eta_abs_error_s_p90']} s ({s['with_eta']} told one)")  # fmt: skip
        self.summary["fairness"] = fair
        self.summary["draw_metrics"] = drawn
        self.summary["verify_draw_exit_code"] = verify.returncode
        counted = (drawn.get("state"), drawn.get("prequeued"), drawn.get("drawn"),
                   drawn["held"] + drawn["rejected"], drawn["held"], drawn["timed"])  # fmt: skip
        n = fair["prequeued"]
        expected = ("done", n, n, n, fair["prequeued_held"], 1)
        if counted != expected:
            print(f"  /metrics counted {counted}, expected {expected}")
        return not fair["problems"] and verify.returncode == 0 and n > 0 and counted == expected

    def throttle(self) -> None:
        """Slow the finalizer of the run's `flashgate serve` down to `--finalizer-share`."""
        assert self.serve.proc is not None
        deadline = time.monotonic() + 10
        while (pid := child_running(self.serve.proc.pid, "finalizer")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no finalizer process under flashgate serve")
            time.sleep(0.1)
        self.throttled = Throttle(pid, self.args.finalizer_share)
        self.throttled.start()
        print(f"finalizer {pid}: runs {self.args.finalizer_share:.0%} of the time")

    def switch(self, mode: str) -> None:
        r = httpx.post(
            f"{self.serve.base}/api/v1/order/switch?mode={mode}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        if r.status_code != 200:
            raise RuntimeError(f"switch to {mode}: {r.status_code} {r.text}")

    def audit(self) -> int:
        argv = [sys.executable, "-m", "gateway", "audit", "--data-dir", str(self.serve.data_dir)]
        audit = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=300)
        text = audit.stdout + audit.stderr
        (self.out / "audit.txt").write_text(text, encoding="utf-8")
        print(f"flashgate audit: exit code {audit.returncode}")
        for line in text.splitlines():
            print(f"  {line}")
        return audit.returncode

    def stop(self) -> int:
        """Locust, then serve (it stops its children in order); then every process seen in
        their trees must be gone. The number left (killed now)."""
        self.scan()
        self.locust.stop()
        if self.throttled is not None:
            self.throttled.stop()
        serve_rc = self.serve.stop()
        if self.cluster is not None:
            self.cluster.stop()
        left = self.tracker.wait_gone(15)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(
            f"stopped: serve exit code {serve_rc}; {len(self.tracker.seen)} processes were "
            f"started, {len(left)} left" + (f": {left}" if left else "")
        )
        self.summary.update(
            serve_exit_code=serve_rc,
            processes=len(self.tracker.seen),
            processes_left=len(left),
        )
        return len(left)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    out = Path(args.out).resolve()
    prepare(out)
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)  # also when started with SIGINT ignored (`&`)
    load = LoadRun(args, out)
    code = 1
    try:
        code = load.execute()
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        code = 130
    except Exception as exc:  # report it, then stop everything all the same
        if not isinstance(exc, RuntimeError):
            traceback.print_exc()
        print(f"load test failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if load.stop() and code == 0:
            code = 1
        (out / "summary.json").write_text(json.dumps(load.summary, indent=2), encoding="utf-8")
        print("result: " + ("OK" if code == 0 else f"FAILED (exit code {code})"))
    return code


if __name__ == "__main__":
    sys.exit(main())
