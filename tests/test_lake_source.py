"""Loading scored trajectories back from the lake for replay, exactly as they were written."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from consumers.lake import LakeIntegrityError, QueryError, iter_scored, load_scored
from tests.factories import DAY, make_scored, write_lake


def test_load_scored_round_trips_records_exactly_including_empty_chunks_and_unicode(tmp_path: Path) -> None:
    rng = random.Random(21)
    records = [
        make_scored(rng),
        make_scored(rng, n_chunks=2, run="other", finished_at=DAY + 86_400),
        make_scored(rng, n_chunks=0, with_task=False),
        make_scored(rng, tool_args='{"path": "/work/naïve 数据.txt", "text": "émoji 🚀 \\" quote"}'),
        make_scored(rng, replay=True),
    ]
    write_lake(tmp_path, records)

    loaded = load_scored(tmp_path, "SELECT traj_id FROM trajectories")

    by_id = {s.traj.traj_id: s for s in loaded}
    assert len(loaded) == len(records)
    for original in records:
        assert by_id[original.traj.traj_id] == original


def test_load_scored_keeps_the_query_order_and_ignores_repeated_ids(tmp_path: Path) -> None:
    rng = random.Random(22)
    records = [make_scored(rng, first_version=i) for i in range(6)]
    write_lake(tmp_path, records)
    write_lake(tmp_path, records[:3], writer_id="w2")  # redelivered

    sql = "SELECT t.traj_id FROM trajectories t JOIN chunks c USING (traj_id) ORDER BY t.policy_version DESC"
    loaded = load_scored(tmp_path, sql)

    assert loaded == sorted(records, key=lambda s: -s.traj.min_version)


def test_iter_scored_yields_batches_of_the_selected_trajectories(tmp_path: Path) -> None:
    rng = random.Random(23)
    records = [make_scored(rng, first_version=i) for i in range(7)]
    write_lake(tmp_path, records)

    batches = list(
        iter_scored(
            tmp_path,
            "SELECT traj_id FROM trajectories WHERE policy_version >= 2 ORDER BY policy_version",
            batch_size=2,
        )
    )

    assert [len(b) for b in batches] == [2, 2, 1]
    assert [s for b in batches for s in b] == records[2:]


def test_load_scored_needs_a_traj_id_column_and_reports_bad_sql(tmp_path: Path) -> None:
    write_lake(tmp_path, [make_scored(random.Random(24))])
    with pytest.raises(QueryError, match="traj_id"):
        load_scored(tmp_path, "SELECT reward FROM trajectories")
    with pytest.raises(QueryError, match="rewardz"):
        load_scored(tmp_path, "SELECT traj_id FROM trajectories WHERE rewardz > 0")


def test_load_scored_from_an_empty_lake_is_empty(tmp_path: Path) -> None:
    assert load_scored(tmp_path, "SELECT traj_id FROM trajectories") == []
    assert load_scored(tmp_path, "SELECT traj_id FROM train_log WHERE fate = 'dropped'") == []


def test_a_trajectory_whose_chunks_are_missing_is_reported_not_truncated(tmp_path: Path) -> None:
    write_lake(tmp_path, [make_scored(random.Random(25))])
    for part in (tmp_path / "chunks").rglob("*.parquet"):
        part.unlink()
    with pytest.raises(LakeIntegrityError, match="0 chunks"):
        load_scored(tmp_path, "SELECT traj_id FROM trajectories")
