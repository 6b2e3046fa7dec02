"""Prometheus metrics every consuming worker shares, labelled by ``worker`` and ``run``.

Declared here, below every worker, so that any of them can count without importing ``ops``;
``ops.metrics`` serves the registry (and re-exports these names). Updates are thread-safe.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MESSAGES = Counter(
    "rollstream_messages_processed",
    "Messages a worker processed and acked.",
    ["worker", "run"],
)
DEAD_LETTERED = Counter(
    "rollstream_messages_dead_lettered",
    "Messages a worker sent to its dead-letter subject.",
    ["worker", "run"],
)
IN_FLIGHT = Gauge(
    "rollstream_in_flight",
    "Units of work a worker holds right now (episodes, verifications, unacked lake messages).",
    ["worker", "run"],
)
