"""SQL over the lake: one deduplicating DuckDB view per table (what ``rollstream query`` opens).

Every function here blocks (DuckDB, file I/O); async callers go through ``anyio.to_thread``.
DuckDB's errors leave this module as ``QueryError`` only.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from consumers.lake.errors import QueryError
from consumers.lake.tables import DEDUPE, SCHEMAS, duckdb_type

HIVE_TYPES = "{'run': 'VARCHAR', 'date': 'DATE'}"


def sql_string(value: str) -> str:
    """``value`` as a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def query_error(exc: duckdb.Error) -> QueryError:
    """DuckDB's error as the lake's ``QueryError`` (one line, DuckDB's words, its class as kind)."""
    return QueryError(str(exc), kind=type(exc).__name__)


def table_glob(root: Path, table: str) -> str:
    """The glob that matches every part of ``table`` (temporary files never match it)."""
    return str(Path(root).absolute() / table / "**" / "*.parquet")


def _first_part(root: Path, table: str) -> Path | None:
    return next((Path(root) / table).glob("**/*.parquet"), None)


def _has_every_column(part: Path, table: str) -> bool:
    """Whether ``part`` holds every declared column (then so does the union of all parts)."""
    try:
        names = set(pq.read_schema(part).names)
    except (OSError, pa.ArrowException):  # unreadable: let DuckDB name the problem
        return True
    return names >= set(SCHEMAS[table].names)


def _typed_nulls(table: str) -> str:
    """A row-less SELECT with every declared column of ``table`` (and ``date``), typed."""
    columns = [f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in SCHEMAS[table]]
    columns.append("CAST(NULL AS DATE) AS date")
    return f"SELECT {', '.join(columns)} WHERE false"


def view_sql(root: Path, table: str) -> str:
    """The ``CREATE VIEW`` statement for one table: its parts, deduplicated, or an empty typed view.

    A view always has every declared column. If the parts were all written before a column
    existed, they are united by name with a typed empty row set, so that column reads as NULL
    (only then: the union makes wide scans about twice as slow).
    """
    first = _first_part(root, table)
    if first is None:
        return f"CREATE OR REPLACE VIEW {table} AS {_typed_nulls(table)}"
    keys, order = DEDUPE[table]
    source = (
        f"read_parquet({sql_string(table_glob(root, table))}, hive_partitioning=true, "
        f"union_by_name=true, filename=true, hive_types={HIVE_TYPES})"
    )
    if not _has_every_column(first, table):
        source = f"({_typed_nulls(table)} UNION ALL BY NAME SELECT * FROM {source})"
    return (
        f"CREATE OR REPLACE VIEW {table} AS SELECT * EXCLUDE (filename) FROM {source} "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1"
    )


def open_lake(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one deduplicating view per lake table.

    A table with no parts yet gets an empty view with its columns; reopen to see its first parts.
    Raises ``QueryError`` if DuckDB cannot open the views (e.g. a part that is not Parquet).
    """
    con = duckdb.connect()
    try:
        for table in SCHEMAS:
            con.execute(view_sql(root, table))
    except duckdb.Error as exc:
        con.close()
        raise query_error(exc) from exc
    except BaseException:
        con.close()
        raise
    return con


def query(root: Path, sql: str) -> pa.Table:
    """Run ``sql`` over the lake's views; any failure becomes a ``QueryError`` with DuckDB's message."""
    con = open_lake(root)
    try:
        relation = con.sql(sql)
        if relation is None:
            raise QueryError("the statement returns no rows: ask with SELECT ... FROM <view>")
        return relation.to_arrow_table()
    except duckdb.Error as exc:
        raise query_error(exc) from exc
    finally:
        con.close()


def count_selected(root: Path, sql: str) -> int:
    """How many distinct trajectories ``sql`` selects (raises ``QueryError`` for bad SQL)."""
    table = query(root, f"SELECT count(DISTINCT traj_id) AS n FROM ({sql}) AS selected")
    return int(table["n"][0].as_py() or 0)
