"""SQL over the Parquet lake: deduplicating views, queries, terminal tables and result files.

Every function here blocks (DuckDB, file I/O); async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.table import Table
from rich.text import Text

from consumers.lake_writer import SCHEMAS

# Which rows are copies of one record (redelivery, a rewritten part), and which copy a view keeps.
# trajectories: a replayed copy (replay=true, same traj_id) never hides the original.
# train_steps: a step redone after a learner restart keeps its latest account.
DEDUPE: dict[str, tuple[str, str]] = {
    "trajectories": ("traj_id", "replay, scored_at, filename"),
    "chunks": ("traj_id, chunk_index", "filename"),
    "train_log": ("run, traj_id, step, fate, source", "time, filename"),
    "train_steps": ("run, step", "time DESC, filename DESC"),
    "tasks": ("run, task_id, sample_idx", "created_at, filename"),
    "filters": ("traj_id, stage", "time DESC, filename DESC"),
}
HIVE_TYPES = "{'run': 'VARCHAR', 'date': 'DATE'}"

_SIMPLE_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.float32(): "FLOAT",
    pa.bool_(): "BOOLEAN",
    pa.date32(): "DATE",
}


class QueryError(Exception):
    """A query DuckDB refused or could not run; ``message`` is DuckDB's own words."""

    def __init__(self, message: str, *, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # DuckDB's exception class, e.g. "BinderException"


def duckdb_type(arrow_type: pa.DataType) -> str:
    """The DuckDB SQL type of an Arrow type used by the lake schemas."""
    if arrow_type in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[arrow_type]
    if pa.types.is_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    if pa.types.is_map(arrow_type):
        return f"MAP({duckdb_type(arrow_type.key_type)}, {duckdb_type(arrow_type.item_type)})"
    raise TypeError(f"no DuckDB type for {arrow_type}")


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def table_glob(root: Path, table: str) -> str:
    """The glob that matches every part of ``table`` (temporary files never match it)."""
    return str(Path(root).absolute() / table / "**" / "*.parquet")


def _has_parts(root: Path, table: str) -> bool:
    return any((Path(root) / table).glob("**/*.parquet"))


def view_sql(root: Path, table: str) -> str:
    """The ``CREATE VIEW`` statement for one table: its parts, deduplicated, or an empty typed view."""
    if not _has_parts(root, table):
        columns = [f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in SCHEMAS[table]]
        columns.append("CAST(NULL AS DATE) AS date")
        return f"CREATE OR REPLACE VIEW {table} AS SELECT {', '.join(columns)} WHERE false"
    keys, order = DEDUPE[table]
    source = (
        f"read_parquet({_sql_string(table_glob(root, table))}, hive_partitioning=true, "
        f"union_by_name=true, filename=true, hive_types={HIVE_TYPES})"
    )
    return (
        f"CREATE OR REPLACE VIEW {table} AS SELECT * EXCLUDE (filename) FROM {source} "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1"
    )


def open_lake(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one deduplicating view per lake table.

    A table with no parts yet gets an empty view with its columns; reopen to see its first parts.
    """
    con = duckdb.connect()
    try:
        for table in SCHEMAS:
            con.execute(view_sql(root, table))
    except BaseException:
        con.close()
        raise
    return con


def query(root: Path, sql: str) -> pa.Table:
    """Run ``sql`` over the lake's views; any failure becomes a ``QueryError`` with DuckDB's message."""
    try:
        con = open_lake(root)
    except duckdb.Error as exc:
        raise QueryError(str(exc), kind=type(exc).__name__) from exc
    try:
        relation = con.sql(sql)
        if relation is None:
            raise QueryError("the statement returns no rows: ask with SELECT ... FROM <view>")
        return relation.to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(str(exc), kind=type(exc).__name__) from exc
    finally:
        con.close()


# --- terminal tables ---------------------------------------------------------------------------

_MAX_CELL = 60
_MAX_ITEMS = 8


def _truncate(text: str, limit: int = _MAX_CELL) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_value(value: Any) -> str:
    """A short, readable rendering of one cell (floats to 6 significant digits, long lists elided)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        items = [format_value(v) for v in value[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"… +{len(value) - _MAX_ITEMS}")
        return _truncate("[" + ", ".join(items) + "]")
    if isinstance(value, dict):
        return _truncate("{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}")
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return _truncate(str(value))


def render_table(table: pa.Table, *, max_rows: int = 50) -> Table:
    """A rich table of the first ``max_rows`` rows; the caption says how many rows there are."""
    shown = table.slice(0, max_rows)
    caption = f"{table.num_rows} rows"
    if table.num_rows > max_rows:
        caption = f"first {max_rows} of {table.num_rows} rows"
    out = Table(caption=caption, header_style="bold")
    for field in table.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        out.add_column(field.name, justify="right" if numeric else "left", overflow="fold")
    # Column-wise, so duplicate column names (``SELECT 1 AS a, 2 AS a``) keep both values.
    for row in zip(*(column.to_pylist() for column in shown.columns), strict=True):
        # Text cells: a value like "[bold]" is data, never rich markup.
        out.add_row(*(Text(format_value(v), style="dim" if v is None else "") for v in row))
    return out


# --- result files ------------------------------------------------------------------------------


def _plain(value: Any, arrow_type: pa.DataType) -> Any:
    """A JSON-ready value: maps become objects, NaN and infinities become null."""
    if value is None:
        return None
    if pa.types.is_map(arrow_type):
        return {k: _plain(v, arrow_type.item_type) for k, v in value}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return [_plain(v, arrow_type.value_type) for v in value]
    if pa.types.is_struct(arrow_type):
        return {f.name: _plain(value[f.name], f.type) for f in arrow_type}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_csv(table: pa.Table, path: Path) -> None:
    """CSV has no nested values: list, map and struct cells are written as JSON text."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if pa.types.is_nested(field.type):
            texts = [
                None if v is None else msgspec.json.encode(_plain(v, field.type)).decode()
                for v in column.to_pylist()
            ]
            columns.append(pa.array(texts, pa.string()))
        else:
            columns.append(column)
    pacsv.write_csv(pa.Table.from_arrays(columns, names=table.column_names), path)


def _write_json(table: pa.Table, path: Path) -> None:
    """JSON Lines: one object per row."""
    encoder = msgspec.json.Encoder()
    types = {f.name: f.type for f in table.schema}
    with open(path, "wb") as fh:
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                fh.write(encoder.encode({k: _plain(v, types[k]) for k, v in row.items()}))
                fh.write(b"\n")


def write_result(table: pa.Table, path: Path, fmt: Literal["csv", "json", "parquet"]) -> None:
    """Save a query result as CSV, JSON Lines or zstd Parquet."""
    path = Path(path)
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
    elif fmt == "csv":
        _write_csv(table, path)
    elif fmt == "json":
        _write_json(table, path)
    else:
        raise ValueError(f"format {fmt!r} is not one of csv, json, parquet")


# --- compaction --------------------------------------------------------------------------------

# What makes two rows copies of one *message* (a redelivery), which compaction may merge. Wider
# than the view keys where a view hides distinct records (a replayed copy, a redone step, a newer
# verdict): compaction removes only true copies and never changes what a view shows.
COMPACT_KEYS: dict[str, tuple[str, str]] = {
    "trajectories": ("traj_id, replay, replay_mode", "scored_at, filename"),
    "chunks": ("traj_id, chunk_index", "filename"),
    "train_log": ("run, traj_id, step, fate, source", "time, filename"),
    "train_steps": ("run, step, time", "filename"),
    "tasks": ("run, task_id, sample_idx, created_at", "filename"),
    "filters": ("traj_id, stage, time", "filename"),
}
ORPHAN_AGE_S = 60.0
# Rows per row group of a compacted part: DuckDB reads row groups in parallel, so a merged part
# keeps groups about as small as the writer's flushes made them.
COMPACT_ROW_GROUP = 16_384


@dataclass
class CompactStats:
    """What one compaction did (totals over the partitions it visited)."""

    partitions: int = 0
    parts_before: int = 0
    parts_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    orphans_removed: int = 0
    tables: dict[str, int] = dataclasses.field(default_factory=dict)  # duplicate rows removed per table


def partitions(root: Path, run: str | None = None) -> list[tuple[str, Path]]:
    """Every ``(table, <table>/run=<run>/date=<date>)`` directory of the lake (of ``run`` if given)."""
    out: list[tuple[str, Path]] = []
    for table in SCHEMAS:
        pattern = f"run={run}/date=*" if run else "run=*/date=*"
        out += [(table, d) for d in sorted((Path(root) / table).glob(pattern)) if d.is_dir()]
    return out


def remove_orphans(root: Path, *, older_than_s: float = ORPHAN_AGE_S) -> int:
    """Delete temporary ``.part-*.tmp`` files older than ``older_than_s`` (left by a crashed writer)."""
    cutoff = time.time() - older_than_s
    removed = 0
    for tmp in Path(root).glob("*/run=*/date=*/.part-*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # a writer renamed or removed it meanwhile
            continue
    return removed


def _parts_source(parts: list[Path]) -> str:
    files = "[" + ", ".join(_sql_string(str(p)) for p in parts) + "]"
    return f"read_parquet({files}, hive_partitioning=false, union_by_name=true, filename=true)"


def _counts(con: duckdb.DuckDBPyConnection, table: str, source: str) -> tuple[int, int]:
    """(rows, distinct messages) of the parts in ``source``; reads the key columns only."""
    key = COMPACT_KEYS[table][0]
    distinct = f"SELECT count(*) FROM (SELECT DISTINCT {key} FROM {source})"
    [(rows, messages)] = con.execute(f"SELECT (SELECT count(*) FROM {source}), ({distinct})").fetchall()
    return int(rows), int(messages)


def _write_compacted(directory: Path, table: str, relation: duckdb.DuckDBPyRelation) -> tuple[Path, int]:
    """Stream ``relation`` into one new part, atomically (temp file, fsync, rename, fsync dir)."""
    schema = SCHEMAS[table]
    name = f"part-{time.time_ns()}-compact{os.getpid()}-000000.parquet"
    tmp, final = directory / f".{name}.tmp", directory / name
    rows = 0
    try:
        with open(tmp, "wb") as fh:
            with pq.ParquetWriter(fh, schema, compression="zstd") as out:
                for batch in relation.to_arrow_reader(COMPACT_ROW_GROUP):
                    columns = [
                        batch.column(f.name).cast(f.type)
                        if f.name in batch.schema.names
                        else pa.nulls(batch.num_rows, f.type)
                        for f in schema
                    ]
                    out.write_batch(
                        pa.RecordBatch.from_arrays(columns, schema=schema), row_group_size=COMPACT_ROW_GROUP
                    )
                    rows += batch.num_rows
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_path(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, rows


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compact_partition(
    con: duckdb.DuckDBPyConnection, table: str, directory: Path
) -> tuple[int, int, int, int]:
    """Merge the parts of one partition into one part without copies.

    Returns (parts before, parts after, rows before, rows after). Only the parts listed at the
    start are merged and removed, so a writer may add parts meanwhile. The new part is durable
    before any old part is removed: readers see every row throughout (twice for a moment, which
    the views hide). A partition that is already one part without copies is left as it is.
    """
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        return 0, 0, 0, 0
    source = _parts_source(parts)
    before, distinct = _counts(con, table, source)
    if len(parts) == 1 and distinct == before:
        return 1, 1, before, before
    key, order = COMPACT_KEYS[table]
    relation = con.sql(
        f"SELECT * EXCLUDE (filename) FROM {source} "
        f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order}) = 1 ORDER BY {key}"
    )
    _, after = _write_compacted(directory, table, relation)
    for part in parts:
        part.unlink(missing_ok=True)
    _fsync_path(directory)
    return len(parts), 1, before, after


def compact(root: Path, *, run: str | None = None, orphan_age_s: float = ORPHAN_AGE_S) -> CompactStats:
    """Compact every partition of the lake (or of ``run``) and remove orphaned temporary files."""
    stats = CompactStats(orphans_removed=remove_orphans(root, older_than_s=orphan_age_s))
    con = duckdb.connect()
    try:
        for table, directory in partitions(root, run):
            n_before, n_after, before, after = compact_partition(con, table, directory)
            if not n_before:
                continue
            stats.partitions += 1
            stats.parts_before += n_before
            stats.parts_after += n_after
            stats.rows_before += before
            stats.rows_after += after
            stats.tables[table] = stats.tables.get(table, 0) + before - after
    finally:
        con.close()
    return stats
