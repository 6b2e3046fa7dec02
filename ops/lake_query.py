"""SQL over the Parquet lake: deduplicating views, queries, terminal tables and result files.

Every function here blocks (DuckDB, file I/O); async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import math
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
