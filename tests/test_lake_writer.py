"""The lake writer: partition layout, durable flushes, and what a failed flush leaves behind."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from consumers.lake import SCHEMAS, LakeWriteError, LakeWriter, query
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.task import Task, TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory

DAY = 1_767_268_800.0  # 2026-01-01T12:00:00Z


def make_chunk(rng: random.Random, index: int, version: int, *, tool_args: str | None = None) -> Chunk:
    """A policy turn with random tokens and log-probs, a tool call and its observation."""
    n_action, n_obs = rng.randint(1, 40), rng.randint(0, 30)
    return Chunk(
        index=index,
        action_tokens=pack_tokens([rng.randrange(50_000) for _ in range(n_action)]),
        action_logprobs=pack_logprobs([-rng.random() * 5 for _ in range(n_action)]),
        policy_version=version,
        tool_name="bash",
        tool_args=tool_args if tool_args is not None else '{"cmd": "ls -la /work"}',
        tool_status=rng.choice(["ok", "error", "timeout"]),
        obs_tokens=pack_tokens([rng.randrange(50_000) for _ in range(n_obs)]),
        obs_text="total 8\ndrwxr-xr-x 2 root root 4096 .\n",
        gen_ms=rng.random() * 100,
        tool_ms=rng.random() * 30,
    )


def make_scored(
    rng: random.Random,
    *,
    run: str = "run1",
    n_chunks: int = 3,
    first_version: int = 0,
    finished_at: float = DAY,
    tool_args: str | None = None,
    replay: bool = False,
    with_task: bool = True,
) -> ScoredTrajectory:
    """A realistic scored trajectory: a prompt and ``n_chunks`` chunks spanning policy versions."""
    task_id = f"task-{rng.randrange(1000)}"
    versions = [first_version + min(i, 1) for i in range(n_chunks)]
    chunks = [make_chunk(rng, i, v, tool_args=tool_args) for i, v in enumerate(versions)]
    traj = Trajectory(
        traj_id=uuid.UUID(int=rng.getrandbits(128)).hex,
        run=run,
        task_id=task_id,
        family="files",
        group_id=f"{run}:{task_id}",
        sample_idx=rng.randrange(8),
        prompt_tokens=pack_tokens([rng.randrange(50_000) for _ in range(rng.randint(5, 60))]),
        chunks=chunks,
        status="completed" if n_chunks else "aborted",
        min_version=min(versions, default=first_version),
        max_version=max(versions, default=first_version),
        sandbox_id=f"sb-{rng.randrange(10**6)}",
        sandbox_owner="sandboxd-a",
        abort_reason="" if n_chunks else "sandbox died",
        started_at=finished_at - 30.5,
        finished_at=finished_at,
        task=make_task(run, task_id).task if with_task else None,
    )
    return ScoredTrajectory(
        traj=traj,
        reward=float(rng.random() < 0.5),
        chunk_rewards=[0.0] * (n_chunks - 1) + [1.0] if n_chunks else [],
        verifier_output="ok\n",
        valid=bool(n_chunks),
        invalid_reason="" if n_chunks else "sandbox",
        flags=["expert"] if rng.random() < 0.5 else [],
        replay=replay,
        replay_mode="ipa" if replay else "",
        scored_at=finished_at + 1.25,
    )


def make_task(run: str = "run1", task_id: str = "task-1", sample_idx: int = 0) -> TaskSample:
    task = Task(
        task_id=task_id,
        family="files",
        instruction="Create /work/out.txt containing «héllo».",
        setup=["mkdir -p /work"],
        verify=["test -f /work/out.txt"],
        group_size=4,
        metadata={"split": "train"},
    )
    return TaskSample(run=run, task=task, sample_idx=sample_idx, created_at=DAY)


def make_train(traj: ScoredTrajectory, step: int = 1, fate: str = "trained") -> TrainRecord:
    return TrainRecord(
        run=traj.traj.run,
        traj_id=traj.traj.traj_id,
        task_id=traj.traj.task_id,
        fate=fate,  # type: ignore[arg-type]
        reason="" if fate == "trained" else "stale",
        learner_version=step,
        min_version=traj.traj.min_version,
        staleness=step - traj.traj.min_version,
        max_staleness=2,
        step=step,
        reward=traj.reward,
        loss=0.5,
        time=DAY + step,
    )


def make_step(step: int = 1, loss: float = 0.5, time: float = DAY) -> StepStats:
    return StepStats(
        run="run1",
        step=step,
        version=step,
        loss=loss,
        samples=8,
        dropped=1,
        mean_reward=0.5,
        mean_ratio=1.0,
        masked_fraction=0.1,
        grad_norm=2.0,
        time=time,
    )


def fill(writer: LakeWriter, rng: random.Random, n: int = 4) -> list[ScoredTrajectory]:
    """Buffer ``n`` trajectories, one task, one train record per trajectory and one step."""
    records = [make_scored(rng, first_version=i % 3) for i in range(n)]
    for scored in records:
        writer.add_scored(scored)
        writer.add_train(make_train(scored))
    writer.add_task(make_task())
    writer.add_train(make_step())
    return records


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_flush_writes_parquet_parts_under_the_partition_layout_and_leaves_no_temp_files(
    tmp_path: Path,
) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    records = fill(writer, random.Random(1))
    n_chunks = sum(len(r.traj.chunks) for r in records)
    assert writer.pending() == 4 + n_chunks + 4 + 1 + 1

    written = writer.flush()

    assert written == {"trajectories": 4, "chunks": n_chunks, "train_log": 4, "tasks": 1, "train_steps": 1}
    assert writer.pending() == 0
    files = all_files(tmp_path)
    assert len(files) == 5
    for path in files:
        table, run, date, name = path.relative_to(tmp_path).parts
        assert table in SCHEMAS
        assert (run, date) == ("run=run1", "date=2026-01-01")
        assert name.startswith("part-") and name.endswith(".parquet") and "-w1-" in name
        meta = pq.ParquetFile(path).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert pq.read_schema(path).remove_metadata() == SCHEMAS[table]
    assert writer.flush() == {}


def test_part_names_are_unique_across_writers_and_flushes(tmp_path: Path) -> None:
    rng = random.Random(2)
    writers = [LakeWriter(tmp_path, writer_id=f"w{i}") for i in range(3)]
    for _ in range(3):
        for writer in writers:
            writer.add_scored(make_scored(rng, n_chunks=0))
            writer.flush()
    names = [p.name for p in all_files(tmp_path)]
    assert len(names) == len(set(names)) == 9


def test_failed_rename_raises_and_keeps_the_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    fill(writer, random.Random(3))
    before = writer.pending()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(LakeWriteError, match="No space left"):
        writer.flush()

    assert writer.pending() == before
    assert not [p for p in all_files(tmp_path)]  # no part, no temp file left behind
    monkeypatch.undo()
    assert sum(writer.flush().values()) == before
    assert writer.pending() == 0


def test_flush_into_an_unwritable_table_directory_raises_and_keeps_the_buffers(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    fill(writer, random.Random(4))
    before = writer.pending()
    (tmp_path / "chunks").write_text("not a directory")  # even root cannot mkdir below a file

    with pytest.raises(LakeWriteError) as info:
        writer.flush()

    assert info.value.table == "chunks"
    assert writer.pending() == before
    assert all_files(tmp_path) == [tmp_path / "chunks"]


def test_a_flush_failing_midway_keeps_only_what_is_not_durable_and_hides_chunkless_trajectories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    records = fill(writer, random.Random(5))
    n_chunks = sum(len(r.traj.chunks) for r in records)
    real_replace, calls = os.replace, []

    def replace_once(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(LakeWriteError):
        writer.flush()

    assert "/chunks/" in str(calls[0])  # chunks become durable before their trajectories
    assert writer.pending() == 4 + 4 + 1 + 1
    assert query(tmp_path, "SELECT count(*) AS n FROM trajectories")["n"][0].as_py() == 0
    assert query(tmp_path, "SELECT count(*) AS n FROM chunks")["n"][0].as_py() == n_chunks


def test_records_partition_by_their_own_utc_date_and_run(tmp_path: Path) -> None:
    rng = random.Random(6)
    writer = LakeWriter(tmp_path, writer_id="w1")
    writer.add_scored(make_scored(rng, run="a", finished_at=DAY))
    writer.add_scored(make_scored(rng, run="b", finished_at=DAY + 86_400))
    writer.flush()
    dirs = sorted(str(p.parent.relative_to(tmp_path)) for p in all_files(tmp_path))
    assert dirs == [
        "chunks/run=a/date=2026-01-01",
        "chunks/run=b/date=2026-01-02",
        "trajectories/run=a/date=2026-01-01",
        "trajectories/run=b/date=2026-01-02",
    ]


def test_a_run_name_that_cannot_be_a_partition_is_refused_before_buffering(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    with pytest.raises(ValueError, match="run"):
        writer.add_scored(make_scored(random.Random(7), run="../escape"))
    with pytest.raises(ValueError, match="writer_id"):
        LakeWriter(tmp_path, writer_id="a/b")
    assert writer.pending() == 0


def test_malformed_token_bytes_are_refused_before_buffering(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path, writer_id="w1")
    scored = make_scored(random.Random(8))
    bad_chunk = Chunk(index=0, action_tokens=b"\x01\x02\x03", action_logprobs=b"", policy_version=0)
    bad = ScoredTrajectory(traj=Trajectory(**{**_fields(scored.traj), "chunks": [bad_chunk]}), reward=0.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        writer.add_scored(bad)
    assert writer.pending() == 0


def _fields(traj: Trajectory) -> dict[str, object]:
    return {f: getattr(traj, f) for f in traj.__struct_fields__}
