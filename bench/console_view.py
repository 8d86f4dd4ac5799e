"""What the ops console's view adds per request on top of its Redis reads: reading back what
every worker of the instance counted (`gateway.telemetry.snapshot.take`) from the metrics
directory, with `--workers` live worker processes that each answered on `--routes` routes.

    python -m bench.console_view --workers 4 --routes 12 --reads 500

Prints one JSON line: milliseconds per read (median and p99) and the files read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

WORKER = """
import sys
from gateway.telemetry import metrics
routes = int(sys.argv[1])
for r in range(routes):
    for code in ("created", "sold_out", "limit_exceeded", "rate_limited", "invalid_request"):
        for i in range(50):
            metrics.answered(f"/route/{r}", 409, code, 0.0001 * i)
metrics.answered("/api/v1/order/create", 202, "created", 0.002)
metrics.BREAKER_STATE.set(0)
metrics.WORKER_MODE.set(0)
metrics.flush()
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--routes", type=int, default=12)
    parser.add_argument("--reads", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(args.routes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.workers)
        ]
        try:
            for w in workers:
                assert w.stdout is not None and w.stdout.readline().strip() == "ready"
            from gateway.telemetry import snapshot

            ticks = itertools.count()  # readings a second apart: each one from the files
            took = []
            for _ in range(args.reads):
                started = time.perf_counter()
                shot = snapshot.take("/api/v1/order/create", clock=lambda: float(next(ticks)))
                took.append((time.perf_counter() - started) * 1000)
            assert len(shot.workers) >= args.workers, shot.workers  # (this process too)
            assert shot.answers["created"] == args.workers, shot.answers
            took.sort()
            print(json.dumps({
                "bench": "console_view.snapshot",
                "python": sys.version.split()[0],
                "workers": args.workers,
                "routes": args.routes,
                "files": len(os.listdir(directory)),
                "median_ms": round(took[len(took) // 2], 3),
                "p99_ms": round(took[int(len(took) * 0.99)], 3),
            }))  # fmt: skip
        finally:
            for w in workers:
                w.communicate("")


if __name__ == "__main__":
    main()
