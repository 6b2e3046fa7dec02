"""Wire records: schema evolution both ways, tags that name incompatible changes, STYLE.md conformance."""

from __future__ import annotations

import inspect
import re
from types import ModuleType
from typing import Any

import msgspec
import numpy as np
import pytest

from schemas import dlq, policy, sandbox, task, train, trajectory
from schemas.arrays import pack_logprobs, pack_tokens, unpack_logprobs, unpack_tokens
from schemas.codec import (
    SchemaError,
    decode,
    encode,
    known_tags,
    scored_decoder,
    tasks_decoder,
    train_decoder,
    traj_decoder,
)
from schemas.task import Task, TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory

WIRE_MODULES: tuple[ModuleType, ...] = (task, trajectory, train, policy, dlq, sandbox)
TAG_RE = re.compile(r"^[a-z_.]+\.v[0-9]+$")


def chunk(i: int, n_tokens: int = 8) -> Chunk:
    return Chunk(
        index=i,
        action_tokens=pack_tokens(range(i, i + n_tokens)),
        action_logprobs=pack_logprobs([-0.5] * n_tokens),
        policy_version=3,
        tool_name="bash",
        tool_args='{"cmd": "ls"}',
        tool_status="ok",
    )


def trajectory_with(chunks: list[Chunk]) -> Trajectory:
    return Trajectory(
        traj_id="r:t:0",
        run="r",
        task_id="t",
        family="files",
        group_id="r:t",
        sample_idx=0,
        prompt_tokens=pack_tokens(range(16)),
        chunks=chunks,
        status="completed",
        min_version=3,
        max_version=3,
        task=Task(task_id="t", family="files", instruction="write hi"),
    )


class NewerTrajectory(Trajectory, frozen=True, kw_only=True, tag="traj.v1", tag_field="kind"):
    """What a newer writer might send: the same tag with an added, defaulted field."""

    reward_model: str = "judge-7b"


def as_plain(record: Any) -> Any:
    """The record as plain msgpack values (dicts, lists, bytes), as another writer would send it."""
    return msgspec.msgpack.decode(encode(record))


def test_an_old_reader_decodes_a_newer_record_with_added_fields() -> None:
    newer = NewerTrajectory(**msgspec.structs.asdict(trajectory_with([chunk(0), chunk(1)])))
    got = decode(traj_decoder, encode(newer))
    assert type(got) is Trajectory
    assert got == trajectory_with([chunk(0), chunk(1)])


def test_an_old_reader_ignores_fields_added_to_nested_records() -> None:
    record = as_plain(ScoredTrajectory(traj=trajectory_with([chunk(0)]), reward=1.0))
    record["judge"] = "v2"
    record["traj"]["chunks"][0]["entropy"] = 0.7
    record["traj"]["task"]["owner"] = "team-b"
    got = decode(scored_decoder, msgspec.msgpack.encode(record))
    assert got.reward == 1.0 and got.traj.chunks == [chunk(0)]


def test_a_new_reader_decodes_an_older_record_and_fills_in_defaults() -> None:
    # Written before prefix_calls, created_at, and the Task tag existed.
    old = {"kind": "task_sample.v1", "run": "r", "task": {"task_id": "t", "family": "f", "instruction": "go"}}
    got = decode(tasks_decoder, msgspec.msgpack.encode(old))
    assert got == TaskSample(run="r", task=Task(task_id="t", family="f", instruction="go"))
    assert got.prefix_calls == [] and got.sample_idx == 0 and got.task.max_turns == 6


def test_a_chunk_written_before_chunks_had_a_tag_still_decodes() -> None:
    record = as_plain(trajectory_with([chunk(0), chunk(1)]))
    for c in record["chunks"]:
        del c["kind"]
    got = decode(traj_decoder, msgspec.msgpack.encode(record))
    assert isinstance(got, Trajectory) and got.chunks == [chunk(0), chunk(1)]


def test_an_incompatible_change_is_rejected_with_an_error_naming_the_tag() -> None:
    record = as_plain(trajectory_with([chunk(0)]))
    record["kind"] = "traj.v2"
    record["chunks"] = "now a parquet path"
    names_the_tag = r"unknown record tag 'traj\.v2': this reader knows traj\.v1, scored\.v1"
    with pytest.raises(SchemaError, match=names_the_tag):
        decode(traj_decoder, msgspec.msgpack.encode(record))


def test_a_record_of_another_stream_is_rejected_naming_its_tag() -> None:
    with pytest.raises(SchemaError, match=r"'traj\.v1'.*knows task_sample\.v1"):
        decode(tasks_decoder, encode(trajectory_with([])))


def test_a_wrong_field_type_is_rejected_naming_the_field_path() -> None:
    record = as_plain(trajectory_with([chunk(0)]))
    record["chunks"][0]["policy_version"] = "three"
    with pytest.raises(SchemaError, match=r"\$\.chunks\[0\]\.policy_version"):
        decode(traj_decoder, msgspec.msgpack.encode(record))


def test_bytes_that_are_not_msgpack_are_rejected_as_such() -> None:
    with pytest.raises(SchemaError, match="not msgpack"):
        decode(train_decoder, b"\xc1\xc1\xc1")


def test_each_stream_decoder_knows_exactly_its_stream_tags() -> None:
    assert known_tags(tasks_decoder) == ("task_sample.v1",)
    assert known_tags(traj_decoder) == ("traj.v1", "scored.v1")
    assert known_tags(train_decoder) == ("train.v2", "step.v1")


def test_train_log_union_decodes_both_of_its_members() -> None:
    rec = TrainRecord(
        run="r", traj_id="x", task_id="t", fate="dropped", reason="stale", learner_version=9,
        min_version=2, staleness=7, max_staleness=4, step=3, reward=0.0,
    )  # fmt: skip
    stats = StepStats(
        run="r", step=3, version=9, loss=0.1, samples=8, dropped=1, mean_reward=0.5,
        mean_ratio=1.0, masked_fraction=0.0, grad_norm=1.2, time=1.0,
    )  # fmt: skip
    assert [decode(train_decoder, encode(r)) for r in (rec, stats)] == [rec, stats]


def test_a_32k_token_trajectory_round_trips_exactly() -> None:
    rng = np.random.default_rng(0)
    chunks = [
        Chunk(
            index=k,
            action_tokens=pack_tokens(rng.integers(0, 150_000, 512)),
            action_logprobs=pack_logprobs(rng.normal(-1.0, 0.5, 512)),
            policy_version=k // 8,
            obs_tokens=pack_tokens(rng.integers(0, 150_000, 512)),
        )
        for k in range(32)
    ]
    traj = trajectory_with(chunks)
    got = decode(traj_decoder, encode(ScoredTrajectory(traj=traj, reward=1.0))).traj  # type: ignore[union-attr]
    assert got == traj
    tokens = sum(len(unpack_tokens(c.action_tokens)) + len(unpack_tokens(c.obs_tokens)) for c in got.chunks)
    assert tokens == 32 * 1024
    logprobs = unpack_logprobs(got.chunks[5].action_logprobs)
    assert np.array_equal(logprobs, unpack_logprobs(chunks[5].action_logprobs))


def wire_records() -> list[type[msgspec.Struct]]:
    return [
        cls
        for module in WIRE_MODULES
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__module__ == module.__name__
    ]


@pytest.mark.parametrize("cls", wire_records(), ids=lambda c: c.__name__)
def test_every_wire_record_is_frozen_kw_only_tagged_and_tolerant(cls: Any) -> None:
    config = cls.__struct_config__
    params = inspect.signature(cls).parameters.values()
    assert config.frozen, f"{cls.__name__} must be frozen=True"
    assert all(p.kind is p.KEYWORD_ONLY for p in params), f"{cls.__name__} must be kw_only=True"
    assert isinstance(config.tag, str) and TAG_RE.match(config.tag), f"{cls.__name__} needs a tag like 'x.v1'"
    assert config.tag_field == "kind"
    assert not config.forbid_unknown_fields, f"{cls.__name__}: wire records must allow unknown fields"


def test_tags_are_unique_across_all_wire_records() -> None:
    tags = [cls.__struct_config__.tag for cls in wire_records()]
    assert len(tags) == len(set(tags)) and len(tags) >= 20
