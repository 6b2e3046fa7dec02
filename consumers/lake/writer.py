"""The lake writer: buffer decoded records, write them as Parquet parts, durably.

Layout: ``<lake>/<table>/run=<run>/date=<YYYY-MM-DD>/part-<unix ns>-<writer id>-<seq>.parquet``.
``run`` is stored in the files too (so every reader sees it as a string); ``date`` lives only in
the path. The NATS consumer loop (``consumers.lake.worker``) calls ``add_*`` per message, then
``flush()``, and acks only after ``flush()`` returns: a flush that raises has made nothing it still
buffers durable.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from consumers.lake.durable import atomic_write
from consumers.lake.errors import LakeRecordError, LakeWriteError
from consumers.lake.tables import (
    EVALS,
    FILTERS,
    FLUSH_ORDER,
    SCHEMAS,
    TRAIN_LOG,
    TRAIN_STEPS,
    EvalRecord,
    FilterVerdict,
)
from schemas.arrays import LOGPROB_DTYPE, TOKEN_DTYPE
from schemas.episode import ChunkRecord
from schemas.task import TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory

_TOKEN_COLUMNS = {"prompt_tokens", "action_tokens", "obs_tokens", "context_tokens"}
_LOGPROB_COLUMNS = {"action_logprobs"}
# A run or writer id becomes a path component: keep it to characters every reader parses as-is.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def partition_date(timestamp: float) -> str:
    """The UTC date (``YYYY-MM-DD``) of a record's own timestamp, or of now when it has none.

    Using the record's time keeps a redelivered record in the same partition as its first copy.
    """
    ts = timestamp if timestamp > 0 else time.time()
    try:
        return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError) as exc:
        raise LakeRecordError(f"timestamp {timestamp!r} has no calendar date: {exc}") from exc


def check_name(kind: str, value: str) -> str:
    """Reject a run or writer id that would not survive as a hive path component."""
    if not _SAFE_NAME.match(value):
        raise LakeRecordError(f"{kind} {value!r} must match {_SAFE_NAME.pattern} to name a lake partition")
    return value


def _token_bytes(kind: str, raw: bytes, width: int) -> bytes:
    if len(raw) % width:
        raise LakeRecordError(f"{kind} has {len(raw)} bytes, not a multiple of {width}")
    return raw


def trajectory_row(scored: ScoredTrajectory) -> dict[str, Any]:
    """One ``trajectories`` row; tokens stay packed bytes until the flush builds Arrow arrays."""
    traj = scored.traj
    num_action = sum(len(c.action_tokens) for c in traj.chunks) // 4
    num_obs = sum(len(c.obs_tokens) for c in traj.chunks) // 4
    return {
        "traj_id": traj.traj_id,
        "run": traj.run,
        "task_id": traj.task_id,
        "family": traj.family,
        "group_id": traj.group_id,
        "sample_idx": traj.sample_idx,
        "source": traj.source,
        "status": traj.status,
        "abort_reason": traj.abort_reason,
        "reward": scored.reward,
        "chunk_rewards": list(scored.chunk_rewards),
        "valid": scored.valid,
        "invalid_reason": scored.invalid_reason,
        "replay": scored.replay,
        "replay_mode": scored.replay_mode,
        "flags": list(scored.flags),
        "num_chunks": len(traj.chunks),
        "num_action_tokens": num_action,
        "num_tokens": len(traj.prompt_tokens) // 4 + num_action + num_obs,
        "min_version": traj.min_version,
        "max_version": traj.max_version,
        "policy_version": traj.oldest_version,
        "sandbox_id": traj.sandbox_id,
        "sandbox_owner": traj.sandbox_owner,
        "started_at": traj.started_at,
        "finished_at": traj.finished_at,
        "scored_at": scored.scored_at,
        "verifier_output": scored.verifier_output,
        "prompt_tokens": _token_bytes("prompt_tokens", traj.prompt_tokens, 4),
        "task": None if traj.task is None else msgspec.json.encode(traj.task).decode(),
        "resumed": traj.resumed,
    }


def chunk_rows(scored: ScoredTrajectory) -> Iterable[dict[str, Any]]:
    """One ``chunks`` row per chunk of the trajectory."""
    traj = scored.traj
    for chunk in traj.chunks:
        yield {
            "traj_id": traj.traj_id,
            "run": traj.run,
            "chunk_index": chunk.index,
            "policy_version": chunk.policy_version,
            "tool_name": chunk.tool_name,
            "tool_args": chunk.tool_args,
            "tool_status": chunk.tool_status,
            "action_tokens": _token_bytes("action_tokens", chunk.action_tokens, 4),
            "action_logprobs": _token_bytes("action_logprobs", chunk.action_logprobs, 4),
            "obs_tokens": _token_bytes("obs_tokens", chunk.obs_tokens, 4),
            "obs_text": chunk.obs_text,
            "gen_ms": chunk.gen_ms,
            "tool_ms": chunk.tool_ms,
            "num_action_tokens": len(chunk.action_tokens) // 4,
            "context_tokens": _token_bytes("context_tokens", chunk.context_tokens, 4),
        }


def chunk_live_row(record: ChunkRecord) -> dict[str, Any]:
    """One ``chunks_live`` row: a chunk of an episode in flight (its tokens wait for ``chunks``)."""
    chunk = record.chunk
    return {
        "traj_id": record.traj_id,
        "run": record.run,
        "task_id": record.task_id,
        "sample_idx": record.sample_idx,
        "chunk_index": chunk.index,
        "policy_version": chunk.policy_version,
        "tool_name": chunk.tool_name,
        "tool_status": chunk.tool_status,
        "num_action_tokens": len(_token_bytes("action_tokens", chunk.action_tokens, 4)) // 4,
        "final": record.final or "",
        "sandbox_id": record.sandbox_id,
        "attempt": record.attempt,
        "resumed": record.resumed,
        "time": record.time,
    }


def task_row(sample: TaskSample) -> dict[str, Any]:
    """One ``tasks`` row: the sample and its task, flattened."""
    task = sample.task
    return {
        "run": sample.run,
        "task_id": task.task_id,
        "sample_idx": sample.sample_idx,
        "family": task.family,
        "instruction": task.instruction,
        "environment": task.environment,
        "setup": list(task.setup),
        "verify": list(task.verify),
        "difficulty": task.difficulty,
        "group_size": task.group_size,
        "max_turns": task.max_turns,
        "metadata": list(task.metadata.items()),
        "prefix_calls": list(sample.prefix_calls),
        "created_at": sample.created_at,
    }


def _packed_list(raws: list[bytes], dtype: np.dtype[Any], arrow_type: pa.DataType) -> pa.Array:
    """A list array from packed little-endian buffers, built from one concatenation (no per-item work)."""
    lengths = np.fromiter((len(r) // dtype.itemsize for r in raws), dtype=np.int64, count=len(raws))
    offsets = np.zeros(len(raws) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.frombuffer(b"".join(raws), dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, arrow_type))


def build_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """An Arrow table with the table's explicit schema from buffered rows."""
    schema = SCHEMAS[table]
    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if field.name in _TOKEN_COLUMNS:
            columns.append(_packed_list(values, TOKEN_DTYPE, pa.int32()))
        elif field.name in _LOGPROB_COLUMNS:
            columns.append(_packed_list(values, LOGPROB_DTYPE, pa.float32()))
        else:
            columns.append(pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def write_part(directory: Path, name: str, table: pa.Table) -> Path:
    """Write ``table`` as ``directory/name`` atomically: temp file, fsync, rename, fsync directory."""

    def fill(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd")

    final = directory / name
    atomic_write(final, fill)
    return final


class LakeWriter:
    """Buffers records per (table, run, date) and flushes each buffer as one Parquet part."""

    def __init__(self, root: Path, *, writer_id: str) -> None:
        self.root = Path(root)
        self.writer_id = check_name("writer_id", writer_id)
        self._seq = 0
        self._buffers: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)

    def _add(self, table: str, run: str, timestamp: float, rows: Iterable[dict[str, Any]]) -> None:
        check_name("run", run)
        rows = list(rows)  # build every row before buffering any: a bad record adds nothing
        if rows:
            self._buffers[(table, run, partition_date(timestamp))].extend(rows)

    def add_task(self, sample: TaskSample) -> None:
        """Buffer one task sample (``tasks`` row)."""
        self._add("tasks", sample.run, sample.created_at, [task_row(sample)])

    def add_scored(self, scored: ScoredTrajectory) -> None:
        """Buffer one scored trajectory: a ``trajectories`` row and one ``chunks`` row per chunk."""
        traj = scored.traj
        check_name("run", traj.run)
        when = traj.finished_at or scored.scored_at or traj.started_at
        date = partition_date(when)
        traj_row, chunks = trajectory_row(scored), list(chunk_rows(scored))
        self._buffers[("trajectories", traj.run, date)].append(traj_row)
        if chunks:
            self._buffers[("chunks", traj.run, date)].extend(chunks)

    def add_chunk_record(self, record: ChunkRecord) -> None:
        """Buffer one chunk of an episode in flight (``chunks_live`` row)."""
        self._add("chunks_live", record.run, record.time or time.time(), [chunk_live_row(record)])

    def add_train(self, record: TrainRecord | StepStats) -> None:
        """Buffer one learner record: a ``train_log`` row or a ``train_steps`` row."""
        if isinstance(record, TrainRecord):
            table, schema = "train_log", TRAIN_LOG
        elif isinstance(record, StepStats):
            table, schema = "train_steps", TRAIN_STEPS
        else:
            raise TypeError(f"add_train takes TrainRecord or StepStats, not {type(record).__name__}")
        self._add(table, record.run, record.time, [{f: getattr(record, f) for f in schema.names}])

    def add_filter(self, verdict: FilterVerdict) -> None:
        """Buffer one filter verdict (``filters`` row)."""
        row = {f: getattr(verdict, f) for f in FILTERS.names}
        row["reasons"] = list(verdict.reasons)
        self._add("filters", verdict.run, verdict.time, [row])

    def add_eval(self, record: EvalRecord) -> None:
        """Buffer one evaluation attempt (``evals`` row)."""
        self._add("evals", record.run, record.time, [{f: getattr(record, f) for f in EVALS.names}])

    def pending(self) -> int:
        """Rows buffered and not yet durable, over all tables."""
        return sum(len(rows) for rows in self._buffers.values())

    def _part_name(self) -> str:
        self._seq += 1
        return f"part-{time.time_ns()}-{self.writer_id}-{self._seq:06d}.parquet"

    def flush(self) -> dict[str, int]:
        """Write every buffer as a durable part and return the rows written per table.

        Each part is written to a temporary file, fsynced, renamed and its directory fsynced; only
        then is its buffer cleared. On failure this raises ``LakeWriteError``: the failed part and
        every part not yet attempted stay buffered (parts already durable are not written twice).
        """
        written: dict[str, int] = {}
        order = {name: i for i, name in enumerate(FLUSH_ORDER)}
        for key in sorted(self._buffers, key=lambda k: (order[k[0]], k[1], k[2])):
            table, run, date = key
            rows = self._buffers[key]
            directory = self.root / table / f"run={run}" / f"date={date}"
            name = self._part_name()
            try:
                write_part(directory, name, build_table(table, rows))
            except Exception as exc:
                raise LakeWriteError(table, directory / name, exc) from exc
            del self._buffers[key]
            written[table] = written.get(table, 0) + len(rows)
        return written
