"""Prometheus metrics: the server that exposes them, and every metric of rollstream by name.

Metrics are declared next to the code they count (``streams.metrics``: messages, dead letters and
work in flight of every worker; ``consumers.lake.metrics``: lake flushes; the others below). They
all live in the default registry and are re-exported here. A process calls
``start_metrics_server(port)`` once (it serves ``/metrics`` on ``127.0.0.1`` from a daemon thread)
and then updates the metrics where the work happens. Every metric has a ``run`` label, most a
``worker`` label (``rollout``, ``reward``, ``learner``, ``lake``, ``producer``, ``sandboxd``).
Updates are thread-safe and cost well under a microsecond.

    from ops import metrics
    metrics.start_metrics_server(9101)
    metrics.EPISODES.labels(run=run, status="completed").inc()
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, start_http_server

from consumers.lake.metrics import FLUSH_ROWS, FLUSH_SECONDS
from streams.metrics import DEAD_LETTERED, IN_FLIGHT, MESSAGES

__all__ = [
    "DEAD_LETTERED",
    "EPISODES",
    "FLUSH_ROWS",
    "FLUSH_SECONDS",
    "IN_FLIGHT",
    "MESSAGES",
    "POLICY_VERSION",
    "REWARDS",
    "TRAIN_SAMPLES",
    "start_metrics_server",
    "track_dead_letters",
]

EPISODES = Counter(
    "rollstream_episodes",
    "Episodes finished by rollout workers, by trajectory status (completed, truncated, aborted).",
    ["run", "status"],
)
REWARDS = Counter(
    "rollstream_scored",
    "Trajectories scored by reward workers, by outcome (success, failure, invalid).",
    ["run", "outcome"],
)
TRAIN_SAMPLES = Counter(
    "rollstream_train_samples",
    "Samples the learner took, by fate (trained, dropped) and source (online, replay).",
    ["run", "fate", "source"],
)
POLICY_VERSION = Gauge(
    "rollstream_policy_version",
    "Policy version the worker holds (learner: the one it trains; rollout: the one it generates with).",
    ["worker", "run"],
)


def start_metrics_server(
    port: int, *, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server and its port.

    ``port=0`` picks a free port (tests). Stop with ``server.shutdown()``; a process exiting
    stops it too.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, int(server.server_port)


async def track_dead_letters(consumer: Any, worker: str, run: str, *, every_s: float = 2.0) -> None:
    """Mirror a ``streams.bus.Consumer``'s dead-letter count into ``DEAD_LETTERED`` until cancelled."""
    seen = 0
    while True:
        await anyio.sleep(every_s)
        now = consumer.stats.dead_lettered
        if now > seen:
            DEAD_LETTERED.labels(worker=worker, run=run).inc(now - seen)
            seen = now
