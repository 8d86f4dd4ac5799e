"""The drawers' metrics of a fair start's draw: the pre-queued orders it decided, by outcome
(HELD or REJECTED), and how long each draw took from its opening to its last batch. Recorded
by the finalizer whose drawer decides the batch (each batch once, whichever drawer sends it);
the per-SKU pre-queued and decided counts and the draw's state are SKU figures read from Redis
(`flashgate_sku_draw_*`, in `metrics`).

A module of its own, as `queueing`: a finalizer has no breaker gauge to show. Under
`flashgate serve` the finalizer writes to the instance's metrics directory, so these reach the
gateway's `GET /metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

DRAW_ORDERS = Counter(
    "flashgate_draw_orders_total",
    "Pre-queued orders a fair start's draw decided, by outcome (HELD, REJECTED)",
    ["outcome"],
)
DRAW_DURATION = Histogram(
    "flashgate_draw_duration_seconds",
    "A fair start's draw, from its opening at the start to its last batch (seconds)",
    buckets=DURATION_BUCKETS,
)
