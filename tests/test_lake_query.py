"""The lake's views: deduplication, plain-reader compatibility, errors, rendering and result files."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from consumers.lake import (
    SCHEMAS,
    EvalRecord,
    FilterVerdict,
    LakeWriter,
    QueryError,
    open_lake,
    query,
    write_result,
)
from consumers.lake.views import view_sql
from ops.lake_cli import render_table
from tests.factories import DAY, chunk_records, fill, make_scored, make_step, make_task, make_train

VIEWS = list(SCHEMAS)


def count(root: Path, view: str) -> int:
    return query(root, f"SELECT count(*) AS n FROM {view}")["n"][0].as_py()


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """A lake where every record of the first batch was delivered and written twice."""
    rng = random.Random(11)
    writer = LakeWriter(tmp_path, writer_id="w1")
    records = fill(writer, rng, n=6)
    for scored in records:
        for record in chunk_records(scored):
            writer.add_chunk_record(record)
    verdicts = [
        FilterVerdict(traj_id=s.traj.traj_id, run="run1", stage="heuristic", verdict="pass", time=DAY)
        for s in records
    ]
    for verdict in verdicts:
        writer.add_filter(verdict)
    attempt = EvalRecord(
        eval_id="e1", run="run1", task_set="tasks", task_id="t", attempt=0, agent="oracle",
        policy="oracle", policy_version=-1, reward=1.0, passed=True, time=DAY,
    )  # fmt: skip
    writer.add_eval(attempt)
    writer.flush()
    redelivered = LakeWriter(tmp_path, writer_id="w2")
    for scored, verdict in zip(records, verdicts, strict=True):
        for record in chunk_records(scored):
            redelivered.add_chunk_record(record)
        redelivered.add_scored(scored)
        redelivered.add_train(make_train(scored))
        redelivered.add_filter(verdict)
    redelivered.add_task(make_task())
    redelivered.add_train(make_step())
    redelivered.add_eval(attempt)
    redelivered.flush()
    return tmp_path


def test_records_written_twice_appear_once_in_every_view(lake: Path) -> None:
    n_chunks = count(
        lake, f"(SELECT DISTINCT traj_id, chunk_index FROM read_parquet('{lake}/chunks/**/*.parquet'))"
    )
    assert count(lake, "trajectories") == 6
    assert count(lake, "chunks") == n_chunks
    assert count(lake, "train_log") == 6
    assert count(lake, "tasks") == 1
    assert count(lake, "train_steps") == 1
    assert count(lake, "filters") == 6
    assert count(lake, "evals") == 1
    dupes = query(lake, "SELECT traj_id FROM trajectories GROUP BY 1 HAVING count(*) > 1")
    assert dupes.num_rows == 0


def test_the_lake_opens_without_rollstream_in_duckdb_pyarrow_and_polars_with_matching_raw_counts(
    lake: Path,
) -> None:
    for table in VIEWS:
        pattern = f"{lake}/{table}/**/*.parquet"
        raw_duck = duckdb.sql(
            f"SELECT count(*) FROM read_parquet('{pattern}', hive_partitioning=true)"
        ).fetchall()[0][0]
        partitioning = ds.partitioning(
            pa.schema([("run", pa.string()), ("date", pa.date32())]), flavor="hive"
        )
        raw_arrow = ds.dataset(lake / table, format="parquet", partitioning=partitioning).count_rows()
        raw_polars = pl.scan_parquet(pattern, hive_partitioning=True).select(pl.len()).collect().item()
        deduped = count(lake, table)
        assert raw_duck == raw_arrow == raw_polars == 2 * deduped > 0, table

    frame = pl.scan_parquet(f"{lake}/trajectories/**/*.parquet", hive_partitioning=True).collect()
    assert frame.schema["run"] == pl.String and frame.schema["date"] == pl.Date
    assert frame.schema["prompt_tokens"] == pl.List(pl.Int32)


def test_views_expose_the_schema_columns_and_the_date_partition(lake: Path) -> None:
    con = open_lake(lake)
    try:
        for table in VIEWS:
            columns = con.sql(f"SELECT * FROM {table} LIMIT 0").columns
            assert columns == [*SCHEMAS[table].names, "date"], table
        assert con.sql("SELECT DISTINCT date FROM trajectories").fetchall()[0][0].isoformat() == "2026-01-01"
    finally:
        con.close()


def test_an_empty_lake_answers_queries_over_every_view_with_zero_rows(tmp_path: Path) -> None:
    for root in (tmp_path / "missing", tmp_path):
        for table in VIEWS:
            result = query(root, f"SELECT * FROM {table}")
            assert result.num_rows == 0
            assert result.column_names == [*SCHEMAS[table].names, "date"]
    summary = query(tmp_path, "SELECT fate, count(*) FROM train_log GROUP BY fate")
    assert summary.num_rows == 0


def test_empty_views_have_the_same_column_types_as_written_parts(lake: Path, tmp_path_factory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    for table in VIEWS:
        full_types = query(lake, f"SELECT * FROM {table} LIMIT 0").schema
        empty_types = query(empty, f"SELECT * FROM {table}").schema
        assert [f.type for f in full_types] == [f.type for f in empty_types], table


def test_parts_written_before_a_column_existed_read_it_as_null(lake: Path) -> None:
    """An older writer had no ``task`` column: the view still has it (NULL), in its declared place."""
    for part in (lake / "trajectories").glob("**/*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["task"]), part)

    table = query(lake, "SELECT * FROM trajectories")

    assert table.column_names == [*SCHEMAS["trajectories"].names, "date"]
    assert table.num_rows == 6 and table["task"].null_count == 6
    assert query(lake, "SELECT count(*) AS n FROM chunks")["n"][0].as_py() > 0  # other views as before


def test_a_lake_with_every_column_gets_the_plain_view_without_a_union(lake: Path) -> None:
    assert all("UNION" not in view_sql(lake, table) for table in VIEWS)


def test_a_bad_query_raises_query_error_with_duckdbs_message(lake: Path) -> None:
    with pytest.raises(QueryError, match="no_such_column") as info:
        query(lake, "SELECT no_such_column FROM trajectories")
    assert info.value.kind == "BinderException"
    with pytest.raises(QueryError, match="syntax error") as info:
        query(lake, "SELEC 1")
    assert "\n" in info.value.message  # DuckDB's words: a message, then the line and a caret marker
    assert str(info.value) == 'Parser Error: syntax error at or near "SELEC" LINE 1: SELEC 1'
    with pytest.raises(QueryError, match="nope"):
        query(lake, "SELECT * FROM nope")


def test_reward_by_policy_version_groups_trajectories_by_their_oldest_weights(tmp_path: Path) -> None:
    rng = random.Random(12)
    writer = LakeWriter(tmp_path, writer_id="w1")
    records = [make_scored(rng, first_version=v % 3) for v in range(9)]
    for scored in records:
        writer.add_scored(scored)
    writer.flush()

    result = query(
        tmp_path, "SELECT policy_version, count(*), avg(reward) FROM trajectories GROUP BY 1 ORDER BY 1"
    )

    versions, counts, means = (c.to_pylist() for c in result.columns)
    assert versions == [0, 1, 2] and counts == [3, 3, 3]
    for v, mean in zip(versions, means, strict=True):
        assert mean == pytest.approx(sum(s.reward for s in records if s.traj.min_version == v) / 3)


def test_a_replayed_copy_never_hides_the_original_trajectory(tmp_path: Path) -> None:
    scored = make_scored(random.Random(13))
    replayed = make_scored(random.Random(13), replay=True)
    assert replayed.traj.traj_id == scored.traj.traj_id
    for i, record in enumerate((replayed, scored)):
        writer = LakeWriter(tmp_path, writer_id=f"w{i}")
        writer.add_scored(record)
        writer.flush()
    assert query(tmp_path, "SELECT replay FROM trajectories")["replay"].to_pylist() == [False]


def test_a_redone_training_step_keeps_its_latest_account(tmp_path: Path) -> None:
    for i, (loss, time) in enumerate([(0.9, DAY), (0.4, DAY + 60)]):
        writer = LakeWriter(tmp_path, writer_id=f"w{i}")
        writer.add_train(make_step(step=5, loss=loss, time=time))
        writer.flush()
    assert query(tmp_path, "SELECT loss FROM train_steps")["loss"].to_pylist() == [0.4]


def test_a_sample_trained_and_later_dropped_keeps_both_train_log_rows(tmp_path: Path) -> None:
    scored = make_scored(random.Random(14))
    writer = LakeWriter(tmp_path, writer_id="w1")
    writer.add_train(make_train(scored, step=1))
    writer.add_train(make_train(scored, step=4, fate="dropped"))
    writer.add_train(make_train(scored, step=4, fate="dropped"))
    writer.flush()
    result = query(tmp_path, "SELECT step, fate FROM train_log ORDER BY step")
    assert result.to_pylist() == [{"step": 1, "fate": "trained"}, {"step": 4, "fate": "dropped"}]


def test_render_table_shows_at_most_max_rows_and_never_reads_values_as_markup() -> None:
    table = pa.table(
        {
            "name": ["[bold]x[/bold]", None, "a" * 200],
            "reward": [0.123456789, 1.0, float("nan")],
            "tokens": [list(range(20)), [], [1]],
        }
    )
    rendered = render_table(table, max_rows=2)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(rendered)
    text = console.file.getvalue()
    assert rendered.row_count == 2
    assert "[bold]x[/bold]" in text and "NULL" in text and "0.123457" in text
    assert "… +12" in text and "first 2 of 3 rows" in text


def test_write_result_saves_csv_json_lines_and_parquet(lake: Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("out")
    result = query(
        lake, "SELECT traj_id, reward, flags, prompt_tokens, date FROM trajectories ORDER BY traj_id"
    )
    tasks = query(lake, "SELECT metadata FROM tasks")

    write_result(result, out / "r.parquet", "parquet")
    assert pq.read_table(out / "r.parquet").equals(result)

    write_result(result, out / "r.csv", "csv")
    csv = pacsv.read_csv(out / "r.csv")
    assert csv["traj_id"].to_pylist() == result["traj_id"].to_pylist()
    assert [json.loads(x) for x in csv["prompt_tokens"].to_pylist()] == result["prompt_tokens"].to_pylist()

    write_result(tasks, out / "t.json", "json")
    assert [json.loads(line) for line in (out / "t.json").read_text().splitlines()] == [
        {"metadata": {"split": "train"}}
    ]
    write_result(result, out / "r.json", "json")
    first = json.loads((out / "r.json").read_text().splitlines()[0])
    assert first["date"] == "2026-01-01" and first["traj_id"] == result["traj_id"][0].as_py()

    with pytest.raises(ValueError, match="xlsx"):
        write_result(result, out / "r.xlsx", "xlsx")  # type: ignore[arg-type]
