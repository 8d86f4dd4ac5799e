"""The queue scenario's report: poll volume and ETA error, from the shoppers' side (the lines
`queue_locustfile.py` wrote) and from the finalizers' (their histogram in `GET /metrics`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def shoppers_side(path: Path, seconds: float, *, prequeued: bool | None = None) -> dict[str, Any]:
    """Reads per order and per second; the ETA error of each order that was told one:
    (when told + eta_s) - when it was decided, in seconds (negative: decided later).
    `prequeued`: only the orders pre-queued for a fair start (True) or the others (False)."""
    lines = [json.loads(b) for b in path.read_bytes().splitlines()] if path.exists() else []
    if prequeued is not None:
        lines = [x for x in lines if bool(x.get("prequeued")) == prequeued]
    reads = [int(x["reads"]) for x in lines]
    errors = [
        x["eta_told_at"] + x["eta_s"] - x["decided_at"]
        for x in lines
        if x.get("eta_s") is not None and x.get("decided_at") is not None
    ]
    waits = [x["decided_at"] - x["queued_at"] for x in lines if x.get("decided_at") is not None]
    return {
        "orders": len(lines),
        "reads": sum(reads),
        "reads_per_order_mean": _rounded(sum(reads) / len(reads)) if reads else None,
        "reads_per_order_max": max(reads, default=None),
        "reads_per_s": _rounded(sum(reads) / seconds) if seconds > 0 else None,
        "first_position_max": max((int(x["first_position"]) for x in lines), default=None),
        "wait_s_p50": _rounded(quantile(waits, 0.5)),
        "wait_s_p90": _rounded(quantile(waits, 0.9)),
        "with_eta": len(errors),
        "eta_error_s_p50": _rounded(quantile(errors, 0.5)),
        "eta_abs_error_s_p50": _rounded(quantile([abs(e) for e in errors], 0.5)),
        "eta_abs_error_s_p90": _rounded(quantile([abs(e) for e in errors], 0.9)),
    }


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    lower, below = None, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if lower is None:
                return upper
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def finalizers_side(metrics: str) -> dict[str, Any]:
    """The finalizers' wait and ETA-error histograms from one scrape: counts, p50, p90."""
    found: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name.endswith("_bucket"):
                found.setdefault(s.name[: -len("_bucket")], []).append(
                    (float(s.labels["le"]), s.value)
                )
            elif s.name.endswith("_count"):
                counts[s.name[: -len("_count")]] = s.value
    out: dict[str, Any] = {}
    for name, key in (
        ("flashgate_queue_wait_seconds", "wait_s"),
        ("flashgate_queue_eta_error_seconds", "eta_error_s"),
    ):
        buckets = found.get(name, [])
        out[f"{key}_count"] = int(counts.get(name, 0))
        out[f"{key}_p50"] = _rounded(histogram_quantile(buckets, 0.5))
        out[f"{key}_p90"] = _rounded(histogram_quantile(buckets, 0.9))
    return out


def print_line(report: dict[str, Any]) -> None:
    s, f = report["shoppers"], report["finalizers"]
    print(
        f"line: {s['orders']} orders decided while their shoppers waited; {s['reads']} reads "
        f"({s['reads_per_order_mean']} per order, at most {s['reads_per_order_max']}; "
        f"{s['reads_per_s']} per second); first position at most {s['first_position_max']}"
    )
    print(f"  wait (shoppers): p50 {s['wait_s_p50']} s, p90 {s['wait_s_p90']} s")
    print(
        f"  ETA error (shoppers, first ETA told vs decided, {s['with_eta']} orders): "
        f"median {s['eta_error_s_p50']} s, |error| p50 {s['eta_abs_error_s_p50']} s, "
        f"p90 {s['eta_abs_error_s_p90']} s"
    )
    print(
        f"  finalizers: {f['wait_s_count']} queued orders decided, wait p50 {f['wait_s_p50']} s "
        f"p90 {f['wait_s_p90']} s; ETA error ({f['eta_error_s_count']} told an ETA when "
        f"queued) p50 {f['eta_error_s_p50']} s, p90 {f['eta_error_s_p90']} s"
    )
