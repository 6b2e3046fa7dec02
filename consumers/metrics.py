"""The rollout and reward groups' own Prometheus metrics (``ops.metrics`` only serves the registry;
the counters every worker shares are in ``streams.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter

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
