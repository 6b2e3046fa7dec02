"""Prometheus metrics every worker shares, labelled by ``worker`` and ``run``.

Declared here, below every worker, so that any of them can count without importing ``ops``;
``ops.metrics`` serves the registry (and re-exports these names). Updates are thread-safe.
"""

from __future__ import annotations

from typing import Any

import anyio
from prometheus_client import Counter, Gauge

from streams.bus import Consumer

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
POLICY_VERSION = Gauge(
    "rollstream_policy_version",
    "Policy version the worker holds (learner: the one it trains; rollout: the one it generates with).",
    ["worker", "run"],
)


async def track_dead_letters(consumer: Consumer[Any], worker: str, run: str, *, every_s: float = 2.0) -> None:
    """Mirror a consumer's dead-letter count into ``DEAD_LETTERED`` until cancelled."""
    seen = 0
    while True:
        await anyio.sleep(every_s)
        now = consumer.stats.dead_lettered
        if now > seen:
            DEAD_LETTERED.labels(worker=worker, run=run).inc(now - seen)
            seen = now
