"""Prometheus metrics: the server that exposes them, and every metric of rollstream by name.

Metrics are declared next to the code they count (``streams.metrics``: messages, dead letters,
work in flight and policy version of every worker; ``consumers.metrics``: episodes and rewards;
``consumers.lake.metrics``: lake flushes; ``learner.metrics``: train samples). They all live in the
default registry and are re-exported here. A process calls
``start_metrics_server(port)`` once (it serves ``/metrics`` on ``127.0.0.1`` from a daemon thread)
and then updates the metrics where the work happens. Every metric has a ``run`` label, most a
``worker`` label (``rollout``, ``reward``, ``learner``, ``lake``, ``producer``, ``sandboxd``).
Updates are thread-safe and cost well under a microsecond.

    from ops.metrics import start_metrics_server
    start_metrics_server(9101)
    EPISODES.labels(run=run, status="completed").inc()  # in consumers.rollout
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from consumers.lake.metrics import FLUSH_ROWS, FLUSH_SECONDS
from consumers.metrics import EPISODES, REWARDS
from learner.metrics import TRAIN_SAMPLES
from streams.metrics import DEAD_LETTERED, IN_FLIGHT, MESSAGES, POLICY_VERSION, track_dead_letters

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


def start_metrics_server(
    port: int, *, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server and its port.

    ``port=0`` picks a free port (tests). Stop with ``server.shutdown()``; a process exiting
    stops it too.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, int(server.server_port)
