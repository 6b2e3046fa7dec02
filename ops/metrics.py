"""Prometheus metrics: one small set of counters and gauges that every worker process imports.

A process calls ``start_metrics_server(port)`` once (it serves ``/metrics`` on ``127.0.0.1``
from a daemon thread) and then updates the metrics below where the work happens. Every metric
has a ``worker`` label (``rollout``, ``reward``, ``learner``, ``lake``, ``producer``,
``sandboxd``) and a ``run`` label. Updates are thread-safe and cost well under a microsecond.

    from ops import metrics
    metrics.start_metrics_server(9101)
    metrics.MESSAGES.labels(worker="lake", run=run).inc(n)
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
FLUSH_ROWS = Counter(
    "rollstream_lake_rows_flushed",
    "Rows the lake writer made durable, by table.",
    ["run", "table"],
)
FLUSH_SECONDS = Histogram(
    "rollstream_lake_flush_seconds",
    "Duration of one lake flush (temp file, fsync, rename, for every table).",
    ["run"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
IN_FLIGHT = Gauge(
    "rollstream_in_flight",
    "Units of work a worker holds right now (episodes, verifications, unacked lake messages).",
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
