"""Compaction: one part per partition, redelivered copies gone, views unchanged, crashes harmless."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from consumers.lake import SCHEMAS, FilterVerdict, LakeWriteError, LakeWriter, compact, query
from tests.factories import DAY, fill, make_scored, make_step, make_train

VIEWS = list(SCHEMAS)


def snapshot(root: Path) -> dict[str, list[tuple]]:
    """Every view's rows, sorted, for before/after comparisons."""
    out = {}
    for view in VIEWS:
        rows = query(root, f"SELECT * FROM {view}").to_pylist()
        out[view] = sorted(tuple(sorted((k, repr(v)) for k, v in r.items())) for r in rows)
    return out


def parts(root: Path) -> list[Path]:
    return sorted(root.glob("*/run=*/date=*/part-*.parquet"))


def raw_rows(root: Path, table: str) -> int:
    partitioning = ds.partitioning(pa.schema([("run", pa.string()), ("date", pa.date32())]), flavor="hive")
    return ds.dataset(root / table, format="parquet", partitioning=partitioning).count_rows()


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """Three flushes of one batch (two redeliveries), a replayed copy, a redone step, two verdicts."""
    rng = random.Random(5)
    writer = LakeWriter(tmp_path, writer_id="w1")
    records = fill(writer, rng, n=5)
    writer.add_filter(
        FilterVerdict(traj_id=records[0].traj.traj_id, run="run1", stage="security", verdict="flag", time=DAY)
    )
    writer.flush()
    for again in ("w2", "w3"):
        copy = LakeWriter(tmp_path, writer_id=again)
        for scored in records:
            copy.add_scored(scored)
            copy.add_train(make_train(scored))
        copy.flush()
    later = LakeWriter(tmp_path, writer_id="w4")
    replayed = make_scored(random.Random(5), replay=True)  # same traj_id as records[0], replay=True
    assert replayed.traj.traj_id == records[0].traj.traj_id
    later.add_scored(replayed)
    later.add_train(make_step(loss=0.25, time=DAY + 60))  # step 1 redone after a restart
    later.add_filter(
        FilterVerdict(
            traj_id=records[0].traj.traj_id, run="run1", stage="security", verdict="pass", time=DAY + 9
        )
    )
    later.flush()
    return tmp_path


def test_compaction_leaves_one_part_per_partition_and_the_views_unchanged(lake: Path) -> None:
    before = snapshot(lake)
    raw_chunks = raw_rows(lake, "chunks")
    assert len(parts(lake)) > len(VIEWS)

    stats = compact(lake)

    assert snapshot(lake) == before
    dirs = {p.parent for p in parts(lake)}
    assert len(parts(lake)) == len(dirs) == stats.partitions == stats.parts_after
    assert raw_rows(lake, "chunks") == query(lake, "SELECT count(*) AS n FROM chunks")["n"][0].as_py()
    assert raw_chunks > 3 * raw_rows(lake, "chunks")  # three flushes of the batch, plus the replay's
    assert stats.tables["chunks"] == raw_chunks - raw_rows(lake, "chunks")
    assert stats.rows_before - stats.rows_after == sum(stats.tables.values())
    for path in parts(lake):
        table = path.relative_to(lake).parts[0]
        assert pq.read_schema(path).remove_metadata() == SCHEMAS[table]


def test_compaction_removes_only_copies_of_one_message(lake: Path) -> None:
    compact(lake)
    # the replayed copy, the redone step's first account and the older verdict are records, not copies
    assert raw_rows(lake, "trajectories") == 5 + 1
    assert raw_rows(lake, "train_steps") == 2
    assert raw_rows(lake, "filters") == 2
    assert raw_rows(lake, "train_log") == 5
    assert query(lake, "SELECT loss FROM train_steps")["loss"].to_pylist() == [0.25]
    verdicts = query(lake, "SELECT verdict FROM filters")["verdict"].to_pylist()
    assert verdicts == ["pass"]
    assert query(lake, "SELECT bool_or(replay) AS r FROM trajectories")["r"][0].as_py() is False


def test_compacting_twice_changes_nothing_and_run_limits_the_partitions(lake: Path) -> None:
    other = LakeWriter(lake, writer_id="w9")
    for _ in range(2):
        other.add_scored(make_scored(random.Random(8), run="run2"))
        other.flush()
    compact(lake, run="run1")
    assert len(list(lake.glob("trajectories/run=run2/date=*/part-*.parquet"))) == 2
    first = sorted(p.name for p in parts(lake))
    again = compact(lake, run="run1")
    assert sorted(p.name for p in parts(lake)) == first
    assert again.rows_before == again.rows_after


def test_a_crash_between_rename_and_removal_leaves_rows_visible_once_and_the_next_run_cleans_up(
    lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(lake)
    real_unlink = Path.unlink

    def crash_on_old_parts(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith("part-") and "compact" not in self.name:
            raise OSError(5, "Input/output error")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_on_old_parts)
    with pytest.raises(LakeWriteError, match="Input/output"):
        compact(lake)
    monkeypatch.undo()
    assert any("compact" in p.name for p in parts(lake))  # the merged part is durable ...
    assert snapshot(lake) == before  # ... next to the old parts: each row is still seen once
    compact(lake)
    assert snapshot(lake) == before
    assert len(parts(lake)) == len({p.parent for p in parts(lake)})


def test_orphaned_temporary_parts_older_than_a_minute_are_removed_and_fresh_ones_kept(lake: Path) -> None:
    directory = next(lake.glob("chunks/run=*/date=*"))
    old, fresh = directory / ".part-1-w1-000001.parquet.tmp", directory / ".part-2-w1-000002.parquet.tmp"
    old.write_bytes(b"half a parquet file")
    fresh.write_bytes(b"being written right now")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    stats = compact(lake)

    assert stats.orphans_removed == 1
    assert not old.exists() and fresh.exists()
