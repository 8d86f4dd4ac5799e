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

import io
import json
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from loadtests.options import parse_args
from loadtests.report import report_files
from loadtests.steps import LoadRun
from loadtests.summary import LATENCY

OUTPUTS = ("accepted.jsonl", "line.jsonl", "serve.log", "locust.log", "audit.txt", "summary.json")


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0] if __doc__ else "")
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
