"""The staleness gate: train a sample only if ``s = N − min(chunk.policy_version) ≤ η``."""

from __future__ import annotations

from schemas.trajectory import Trajectory


def staleness(learner_version: int, traj: Trajectory) -> int:
    """``N − min(chunk.policy_version)``; a trajectory with no chunks falls back to ``min_version``."""
    oldest = min((c.policy_version for c in traj.chunks), default=traj.min_version)
    return learner_version - oldest


def admit(learner_version: int, traj: Trajectory, max_staleness: int) -> tuple[bool, int]:
    """Whether the sample may be trained at learner version ``N``, and its staleness."""
    s = staleness(learner_version, traj)
    return s <= max_staleness, s
