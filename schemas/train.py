"""The learner's account of every sample and step, on ``rs.train.log.<run>`` (learner -> lake)."""

from __future__ import annotations

from typing import Literal

import msgspec

Fate = Literal["trained", "dropped"]
# Why a sample was dropped ("" when trained). Values that vary (a staleness, the reward group's
# explanation) live in their own fields, never in the reason, so reasons stay a closed set.
# "uninformative": the sample's task group had one reward for all (dynamic sampling, no group signal).
DropReason = Literal["", "stale", "duplicate", "invalid", "empty", "flagged", "uninformative"]
# Online samples obey the staleness bound; replays from the lake are exempt by design.
SampleSource = Literal["online", "replay"]


class TrainRecord(msgspec.Struct, frozen=True, kw_only=True, tag="train.v2", tag_field="kind"):
    """What the learner did with one sample: trained at ``step``, or dropped with ``reason``.

    ``train.v2``: ``reason`` became a closed set with ``detail`` beside it (``train.v1`` carried
    free text such as ``stale: s=93 > eta=2``).
    """

    run: str
    traj_id: str
    task_id: str
    fate: Fate
    reason: DropReason
    learner_version: int  # N when the sample was taken
    min_version: int
    staleness: int  # N - min_version
    max_staleness: int  # the bound in force
    step: int
    reward: float
    source: SampleSource = "online"
    loss: float = 0.0
    time: float = 0.0
    detail: str = ""  # e.g. the reward group's reason for an invalid sample


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
    # task groups dropped as uninformative (dynamic sampling) since the previous step
    filtered_groups: int = 0
    # seconds the learner waited for this step's batch (idle: no samples to train), and then spent
    # on it (triage, training, checkpoint, weights) until this record
    wait_s: float = 0.0
    busy_s: float = 0.0


TrainLog = TrainRecord | StepStats
