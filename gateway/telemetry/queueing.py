"""The finalizers' metrics of the QUEUE_ONLY line: how long a QUEUED order waited for its
decision, and how far off the ETA it was told when queued was (predicted minus actual: negative
when the ETA was too short). The queue's length and drain rate are SKU figures read from Redis
(`flashgate_sku_backlog`, `flashgate_sku_drain_rate`, in `metrics`).

A module of their own: importing `metrics` makes a process show its breaker gauge, which a
finalizer has none of. Under `flashgate serve` the finalizer writes to the instance's metrics
directory, so these reach the gateway's `GET /metrics`."""

from __future__ import annotations

from prometheus_client import Histogram

WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
ETA_ERROR_BUCKETS = (-300.0, -60.0, -30.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0,
                     0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip

QUEUE_WAIT = Histogram(
    "flashgate_queue_wait_seconds",
    "How long a QUEUED order waited for its decision (HELD or REJECTED)",
    buckets=WAIT_BUCKETS,
)
ETA_ERROR = Histogram(
    "flashgate_queue_eta_error_seconds",
    "ETA told when an order was queued minus the wait it had (orders queued with an ETA)",
    buckets=ETA_ERROR_BUCKETS,
)
