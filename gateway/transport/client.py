"""The transport's names under one import, for importers not yet pointed at the module of
each name's job (connect, replies, wire, cluster, durable). Nothing new imports from here."""

from __future__ import annotations

from gateway.transport.cluster import ClusterMux, SlotMoving, first_key
from gateway.transport.connect import Client, create_client, create_script_client, no_retry
from gateway.transport.durable import AckedWrites, NotDurable, acked
from gateway.transport.replies import REDIS_FAILURES, NotSent, call, text
from gateway.transport.wire import Multiplexed, tls_context

__all__ = [
    "REDIS_FAILURES",
    "AckedWrites",
    "Client",
    "ClusterMux",
    "Multiplexed",
    "NotDurable",
    "NotSent",
    "SlotMoving",
    "acked",
    "call",
    "create_client",
    "create_script_client",
    "first_key",
    "no_retry",
    "text",
    "tls_context",
]
