"""One encoder and one typed decoder per stream union, built once and reused.

Schema evolution (DESIGN.md): new fields get defaults, so an old reader ignores fields it does not
know and a new reader fills in what an old writer did not send; an incompatible change gets a new
tag, which a reader that does not know it rejects with ``SchemaError`` naming the tag.
"""

from __future__ import annotations

import re
import typing
from typing import Any, TypeVar

import msgspec

from schemas.dlq import DeadLetter
from schemas.episode import ChunkRecord, EpisodeSandbox
from schemas.policy import PolicyVersion
from schemas.task import Task, TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory, Trajectory

T = TypeVar("T")

encoder = msgspec.msgpack.Encoder()

tasks_decoder = msgspec.msgpack.Decoder(TaskSample)
task_decoder = msgspec.msgpack.Decoder(Task)  # the task registry (KV rs_tasks)
traj_decoder = msgspec.msgpack.Decoder(Trajectory | ScoredTrajectory)
scored_decoder = msgspec.msgpack.Decoder(ScoredTrajectory)
raw_traj_decoder = msgspec.msgpack.Decoder(Trajectory)
train_decoder = msgspec.msgpack.Decoder(TrainRecord | StepStats)
policy_decoder = msgspec.msgpack.Decoder(PolicyVersion)
dlq_decoder = msgspec.msgpack.Decoder(DeadLetter)
chunk_record_decoder = msgspec.msgpack.Decoder(ChunkRecord)  # rs.traj.chunks.<run>.<episode>
episode_sandbox_decoder = msgspec.msgpack.Decoder(EpisodeSandbox)  # KV rs_episodes

_BAD_TAG = re.compile(r"^Invalid value '(?P<tag>[^']*)' - at `\$\.kind`$")


class SchemaError(msgspec.ValidationError):
    """Bytes that are not a record this reader accepts; the message names the tag or field path."""


def encode(record: Any) -> bytes:
    """Encode any record as msgpack."""
    return encoder.encode(record)


def known_tags(decoder: msgspec.msgpack.Decoder[Any]) -> tuple[str, ...]:
    """The record tags a decoder accepts at the top level (its union's members, in order)."""
    members = typing.get_args(decoder.type) or (decoder.type,)
    tags = (getattr(getattr(m, "__struct_config__", None), "tag", None) for m in members)
    return tuple(t for t in tags if isinstance(t, str))


def decode(decoder: msgspec.msgpack.Decoder[T], data: bytes) -> T:
    """Decode with ``decoder``; raise ``SchemaError`` with a sentence a log reader can act on."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SchemaError(explain(decoder, exc)) from exc


def explain(decoder: msgspec.msgpack.Decoder[Any], exc: msgspec.DecodeError) -> str:
    """One sentence for a decode failure; an unknown tag is named with the tags this reader knows."""
    text = str(exc)
    bad = _BAD_TAG.match(text)
    if bad is not None:
        known = ", ".join(known_tags(decoder))
        return (
            f"unknown record tag {bad['tag']!r}: this reader knows {known}; either the record "
            "belongs on another stream or an incompatible schema change needs a reader for the new tag"
        )
    if not isinstance(exc, msgspec.ValidationError):
        return f"not msgpack: {text}"
    return f"invalid record: {text}"
