"""The lake writer: partition layout, durable flushes, and what a failed flush leaves behind."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from consumers.lake import SCHEMAS, LakeWriteError, LakeWriter, query
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from tests.factories import DAY, fill, make_scored


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
