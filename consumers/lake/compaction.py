"""Compaction: merge the parts of each partition into one part and drop redelivered copies.

Blocking (DuckDB, file I/O). DuckDB's errors leave as ``QueryError``, file errors as
``LakeWriteError``; a partition whose merge failed keeps its old parts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from consumers.lake.durable import TMP_MARK, atomic_write, fsync_dir
from consumers.lake.errors import LakeWriteError
from consumers.lake.tables import COMPACT_KEYS, SCHEMAS
from consumers.lake.views import query_error, sql_string

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
    """Delete temporary part files older than ``older_than_s`` (left by a crashed writer)."""
    cutoff = time.time() - older_than_s
    removed = 0
    # ".part-<...>.parquet.tmp-<hex>" (``durable.atomic_write``), and ".tmp" from older writers
    for tmp in Path(root).glob("*/run=*/date=*/.part-*.tmp*"):
        if not (tmp.name.endswith(".tmp") or TMP_MARK in tmp.name):
            continue
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # a writer renamed or removed it meanwhile
            continue
    return removed


def _parts_source(parts: list[Path]) -> str:
    files = "[" + ", ".join(sql_string(str(p)) for p in parts) + "]"
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
    final = directory / f"part-{time.time_ns()}-compact{os.getpid()}-000000.parquet"

    def fill(tmp: Path) -> int:
        rows = 0
        with pq.ParquetWriter(tmp, schema, compression="zstd") as out:
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
        return rows

    return final, atomic_write(final, fill)


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
    fsync_dir(directory)
    return len(parts), 1, before, after


def compact(root: Path, *, run: str | None = None, orphan_age_s: float = ORPHAN_AGE_S) -> CompactStats:
    """Compact every partition of the lake (or of ``run``) and remove orphaned temporary files."""
    stats = CompactStats(orphans_removed=remove_orphans(root, older_than_s=orphan_age_s))
    con = duckdb.connect()
    try:
        for table, directory in partitions(root, run):
            try:
                n_before, n_after, before, after = compact_partition(con, table, directory)
            except duckdb.Error as exc:
                raise query_error(exc) from exc
            except OSError as exc:
                message = f"could not compact {table} partition {directory}: {exc}"
                raise LakeWriteError(table, directory, exc, message=message) from exc
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
