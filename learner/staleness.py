"""The staleness gate: train a sample only if ``s = N − min(chunk.policy_version) ≤ η``."""

from __future__ import annotations

from schemas.trajectory import Trajectory


def staleness(learner_version: int, traj: Trajectory) -> int:
    """``N − min(chunk.policy_version)`` (see ``Trajectory.oldest_version``): the one definition the
    gate, the train log and the lake's audit use."""
    return learner_version - traj.oldest_version


def admit(learner_version: int, traj: Trajectory, max_staleness: int) -> tuple[bool, int]:
    """Whether the sample may be trained at learner version ``N``, and its staleness."""
    s = staleness(learner_version, traj)
    return s <= max_staleness, s
