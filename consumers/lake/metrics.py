"""The lake writer's own Prometheus metrics (``ops.metrics`` only serves the registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
