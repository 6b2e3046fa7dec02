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
- ``errors``: ``LakeError`` and its subclasses; ``metrics``: the worker's Prometheus metrics; ``settings``:
  ``LakeSettings`` (section ``[lake]``).

Everything but ``worker.run`` blocks; async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each public name and the module that defines it, loaded on first use (PEP 562): importing
# ``consumers.lake.settings`` or ``consumers.lake.metrics`` (every worker does, through the
# configuration and the metrics registry) then costs no DuckDB or pyarrow (~80 MB per process).
_HOME = {
    "CompactStats": "compaction",
    "compact": "compaction",
    "atomic_write": "durable",
    "LakeError": "errors",
    "LakeIntegrityError": "errors",
    "LakeRecordError": "errors",
    "LakeWriteError": "errors",
    "QueryError": "errors",
    "write_result": "export",
    "iter_scored": "reader",
    "load_scored": "reader",
    "SCHEMAS": "tables",
    "EvalRecord": "tables",
    "FilterVerdict": "tables",
    "count_selected": "views",
    "open_lake": "views",
    "query": "views",
    "run": "worker",
    "LakeWriter": "writer",
    "check_name": "writer",
}

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
