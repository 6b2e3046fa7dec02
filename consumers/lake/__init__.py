"""The Parquet lake: every record that crosses the broker, queryable with DuckDB, replayable.

One home for the lake (docs/lake.md):

- ``tables``: the Arrow schema, view key and compaction key of every table, declared once;
- ``writer``: ``LakeWriter`` buffers records and flushes them as Parquet parts, durably;
- ``durable``: ``atomic_write``, the one temp-file/fsync/rename/fsync-dir helper (parts, compacted
  parts, learner checkpoints);
- ``views``: the deduplicating DuckDB views (``open_lake``, ``query``) that ``rollstream query`` opens;
- ``reader``: full ``ScoredTrajectory`` records back from the lake (replay, resampling, filters);
- ``compaction``: merge each partition's parts, drop redelivered copies, remove orphaned temp files;
- ``export``: query results as CSV, JSON Lines or Parquet, to a file or a stream;
- ``worker``: ``run``, the lake worker process (``rollstream worker lake``);
- ``errors``: ``LakeError`` and its subclasses; ``metrics``: the worker's Prometheus metrics.

Everything but ``worker.run`` blocks; async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

from consumers.lake.compaction import CompactStats, compact
from consumers.lake.durable import atomic_write
from consumers.lake.errors import (
    LakeError,
    LakeIntegrityError,
    LakeRecordError,
    LakeWriteError,
    QueryError,
)
from consumers.lake.export import write_result
from consumers.lake.reader import iter_scored, load_scored
from consumers.lake.tables import SCHEMAS, EvalRecord, FilterVerdict
from consumers.lake.views import count_selected, open_lake, query
from consumers.lake.worker import run
from consumers.lake.writer import LakeWriter, check_name

__all__ = [
    "SCHEMAS",
    "CompactStats",
    "EvalRecord",
    "FilterVerdict",
    "LakeError",
    "LakeIntegrityError",
    "LakeRecordError",
    "LakeWriteError",
    "LakeWriter",
    "QueryError",
    "atomic_write",
    "check_name",
    "compact",
    "count_selected",
    "iter_scored",
    "load_scored",
    "open_lake",
    "query",
    "run",
    "write_result",
]
