"""The learner's own Prometheus metrics (``ops.metrics`` only serves the registry)."""

from __future__ import annotations

from prometheus_client import Counter

TRAIN_SAMPLES = Counter(
    "rollstream_train_samples",
    "Samples the learner took, by fate (trained, dropped) and source (online, replay).",
    ["run", "fate", "source"],
)
