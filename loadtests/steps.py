"""The runner's steps: one `LoadRun` starts the gateway, configures the SKUs, runs Locust,
drains, audits and checks, prints the report, and stops everything it started."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.ops.embedded import free_port
from gateway.ops.localcluster import LocalCluster
from loadtests import fairness, line as queue_line
from loadtests.options import LOCUSTFILES
from loadtests.procs import Locust, Serve, Throttle, Tracker, child_running
from loadtests.report import read_locust, report_files
from loadtests.summary import LATENCY, groups, print_findings, print_groups, print_locust
from loadtests.verify import Findings, check_records, check_skus, drain, read_records

PREQUEUE_S = 3600  # the fair start's window: open from the SKU's configuration
PROMOTION = "promo-load"
HOT = "hot"


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
        self.begin()
        locust_rc, seconds = self.shop()
        findings, waited, audit_rc, fair = self.check()
        stats = read_locust(self.out / "locust")
        print_locust(stats, seconds)
        found = groups(self.out, stats)
        print_groups(found)
        print_findings(findings)
        fair_ok = self.report_line(fair, seconds)
        counts = findings.counts()
        ok = (
            fair_ok
            and not any(counts.values())
            and (audit_rc, locust_rc, stats.failures, stats.exceptions) == (0, 0, 0, 0)
            and waited is not None
            and stats.requests > 0
        )
        reports = report_files(self.out / "locust", self.out / "report.html")
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

    def begin(self) -> None:
        """Serve started, the SKUs (and the scalpers' limits) configured, the mode, the
        finalizer's pace and the fair start set: everything before Locust."""
        args, serve = self.args, self.serve
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

    def shop(self) -> tuple[int, float]:
        """Locust's run, to its end: its exit code and how long it took."""
        args, serve = self.args, self.serve
        span = args.spawn_seconds + args.hold_seconds + args.tail_seconds
        started = time.monotonic()
        self.locust.start()
        locust_rc = self.locust.wait(span + 120, self.scan)
        if self.throttled is not None:
            self.throttled.stop()  # the drain below runs at full speed
        seconds = time.monotonic() - started
        self.scan()
        print(f"locust: exit code {locust_rc} after {seconds:.1f} s, log {self.out / 'locust.log'}")
        if serve.proc is not None and serve.proc.poll() is not None:
            raise RuntimeError(
                f"flashgate serve exited during the run (code {serve.proc.returncode}); "
                f"the end of {serve.log_path}:\n{serve.log_tail()}"
            )
        self.switch("NORMAL")  # the operator may have been stopped in QUEUE_ONLY
        return locust_rc, seconds

    def check(self) -> tuple[Findings, float | None, int, dict[str, Any] | None]:
        """The drain, the audit and the checks of the figures and of every recorded answer:
        the findings, the drain's time (None: not done), the audit's exit code and, for a
        fair start, its fairness."""
        args, out, serve = self.args, self.out, self.serve
        findings = Findings()
        fair: dict[str, Any] | None = None
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
        return findings, waited, audit_rc, fair

    def report_line(self, fair: dict[str, Any] | None, seconds: float) -> bool:
        """The queue scenarios' report of the line (and the fair start's): False when the fair
        start was not fair."""
        if self.args.scenario not in ("queue", "prequeue"):
            return True
        metrics = httpx.get(f"{self.serve.base}/metrics", timeout=10).text
        self.summary["line"] = report = {
            "shoppers": queue_line.shoppers_side(self.out / "line.jsonl", seconds),
            "finalizers": queue_line.finalizers_side(metrics),
        }
        queue_line.print_line(report)
        if self.args.scenario != "prequeue":
            return True
        assert fair is not None  # checked for every prequeue run
        return self.report_fair_start(fair, fairness.draw_metrics(metrics, HOT), seconds)

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
