"""The lake's one exception tree. Library errors (OS, DuckDB, Arrow) are mapped here, at the edge.

``LakeError`` and below it:

- ``LakeRecordError``: a record or name the lake cannot hold (also a ``ValueError``): dead-letter it;
- ``LakeWriteError``: a flush (or a compaction) could not make a part durable; nothing is lost;
- ``QueryError``: SQL DuckDB refused or could not run; ``str()`` is one line;
- ``LakeIntegrityError``: the lake holds a trajectory that does not add up (chunks missing).
"""

from __future__ import annotations

from pathlib import Path


class LakeError(Exception):
    """Anything the lake library refuses or fails to do."""


class LakeRecordError(LakeError, ValueError):
    """A record, run name or writer id the lake cannot hold; nothing of it was buffered."""


class LakeWriteError(LakeError):
    """A flush could not make a part durable; the records of that part are still buffered."""

    def __init__(self, table: str, path: Path, cause: BaseException, *, message: str = "") -> None:
        super().__init__(message or f"could not write {table} part {path}: {cause}")
        self.table = table
        self.path = path


class QueryError(LakeError):
    """A query DuckDB refused or could not run.

    ``message`` is DuckDB's own words; ``str()`` folds them into one line (DuckDB adds the
    offending line and a caret marker below its first line); ``kind`` is DuckDB's exception class,
    e.g. ``"BinderException"``.
    """

    def __init__(self, message: str, *, kind: str = "") -> None:
        super().__init__(one_line(message))
        self.message = message
        self.kind = kind


class LakeIntegrityError(LakeError):
    """The lake holds a trajectory whose chunks do not match its ``num_chunks``."""


def one_line(message: str) -> str:
    """DuckDB's multi-line message as one line: caret markers dropped, the rest joined."""
    parts = [line.strip() for line in message.splitlines()]
    return " ".join(p for p in parts if p and set(p) != {"^"})
