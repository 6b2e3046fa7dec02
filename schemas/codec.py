"""One encoder and one typed decoder per stream union, built once and reused."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.dlq import DeadLetter
from schemas.policy import PolicyVersion
from schemas.task import TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory, Trajectory

encoder = msgspec.msgpack.Encoder()

tasks_decoder = msgspec.msgpack.Decoder(TaskSample)
traj_decoder = msgspec.msgpack.Decoder(Trajectory | ScoredTrajectory)
scored_decoder = msgspec.msgpack.Decoder(ScoredTrajectory)
raw_traj_decoder = msgspec.msgpack.Decoder(Trajectory)
train_decoder = msgspec.msgpack.Decoder(TrainRecord | StepStats)
policy_decoder = msgspec.msgpack.Decoder(PolicyVersion)
dlq_decoder = msgspec.msgpack.Decoder(DeadLetter)


def encode(record: Any) -> bytes:
    """Encode any record as msgpack."""
    return encoder.encode(record)
