"""The learner's account of every sample and step, on ``rs.train.log.<run>`` (learner -> lake)."""

from __future__ import annotations

from typing import Literal

import msgspec

Fate = Literal["trained", "dropped"]


class TrainRecord(msgspec.Struct, frozen=True, kw_only=True, tag="train.v1", tag_field="kind"):
    """What the learner did with one sample: trained at ``step``, or dropped with ``reason``."""

    run: str
    traj_id: str
    task_id: str
    fate: Fate
    reason: str  # "" when trained; "stale", "invalid", ... when dropped
    learner_version: int  # N when the sample was taken
    min_version: int
    staleness: int  # N - min_version
    max_staleness: int  # the bound in force
    step: int
    reward: float
    source: str = "online"  # "online" | "replay"
    loss: float = 0.0
    time: float = 0.0


class StepStats(msgspec.Struct, frozen=True, kw_only=True, tag="step.v1", tag_field="kind"):
    """One optimiser step's learning statistics."""

    run: str
    step: int
    version: int
    loss: float
    samples: int
    dropped: int
    mean_reward: float
    mean_ratio: float
    masked_fraction: float
    grad_norm: float
    time: float


TrainLog = TrainRecord | StepStats
