"""Read scored trajectories back from the lake, exactly as they were written (replay, filters).

A SQL query over the lake's views picks the trajectories (it must select a ``traj_id`` column);
this module rebuilds each full ``ScoredTrajectory`` (chunks, tokens, log-probabilities, versions,
reward) from the ``trajectories`` and ``chunks`` views. Blocking: async callers use
``anyio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import numpy as np
import pyarrow as pa

from consumers.lake.errors import LakeIntegrityError, QueryError
from consumers.lake.views import open_lake, query_error
from schemas.arrays import LOGPROB_DTYPE, TOKEN_DTYPE
from schemas.task import Task
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory

_task_decoder = msgspec.json.Decoder(Task)


def _packed(column: pa.ChunkedArray, dtype: np.dtype[Any]) -> list[bytes]:
    """Each list cell of ``column`` as packed little-endian bytes (null cells become ``b""``)."""
    array = column.combine_chunks()
    if isinstance(array, pa.ChunkedArray):  # pragma: no cover - older pyarrow
        array = array.chunk(0) if array.num_chunks else pa.array([], column.type)
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [flat[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(array))]


def _chunks_by_traj(table: pa.Table) -> dict[str, list[Chunk]]:
    actions = _packed(table["action_tokens"], TOKEN_DTYPE)
    logprobs = _packed(table["action_logprobs"], LOGPROB_DTYPE)
    observations = _packed(table["obs_tokens"], TOKEN_DTYPE)
    contexts = (
        _packed(table["context_tokens"], TOKEN_DTYPE)
        if "context_tokens" in table.column_names
        else [b""] * table.num_rows
    )
    plain = table.select(
        [
            "traj_id",
            "chunk_index",
            "policy_version",
            "tool_name",
            "tool_args",
            "tool_status",
            "obs_text",
            "gen_ms",
            "tool_ms",
        ]
    ).to_pylist()
    out: dict[str, list[Chunk]] = {}
    for row, action, logprob, obs, context in zip(
        plain, actions, logprobs, observations, contexts, strict=True
    ):
        out.setdefault(row["traj_id"], []).append(
            Chunk(
                index=row["chunk_index"],
                action_tokens=action,
                action_logprobs=logprob,
                policy_version=row["policy_version"],
                tool_name=row["tool_name"],
                tool_args=row["tool_args"],
                tool_status=row["tool_status"],
                obs_tokens=obs,
                obs_text=row["obs_text"],
                gen_ms=row["gen_ms"],
                tool_ms=row["tool_ms"],
                context_tokens=context,
            )
        )
    return out


def _scored(row: dict[str, Any], prompt: bytes, chunks: list[Chunk]) -> ScoredTrajectory:
    if len(chunks) != row["num_chunks"]:
        raise LakeIntegrityError(
            f"trajectory {row['traj_id']} has {len(chunks)} chunks in the lake, expected {row['num_chunks']}"
        )
    traj = Trajectory(
        traj_id=row["traj_id"],
        run=row["run"],
        task_id=row["task_id"],
        family=row["family"],
        group_id=row["group_id"],
        sample_idx=row["sample_idx"],
        prompt_tokens=prompt,
        chunks=chunks,
        status=row["status"],
        min_version=row["min_version"],
        max_version=row["max_version"],
        sandbox_id=row["sandbox_id"],
        sandbox_owner=row["sandbox_owner"],
        abort_reason=row["abort_reason"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        source=row["source"],
        task=None if row["task"] is None else _task_decoder.decode(row["task"]),
    )
    return ScoredTrajectory(
        traj=traj,
        reward=row["reward"],
        chunk_rewards=list(row["chunk_rewards"] or []),
        verifier_output=row["verifier_output"],
        valid=row["valid"],
        invalid_reason=row["invalid_reason"],
        flags=list(row["flags"] or []),
        replay=row["replay"],
        replay_mode=row["replay_mode"],
        scored_at=row["scored_at"],
    )


def _selected_ids(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    """The distinct traj_ids the query selects, in the query's order."""
    try:
        relation = con.sql(sql)
        if relation is None:
            raise QueryError("the statement returns no rows: select traj_id FROM <view> ...")
        if "traj_id" not in relation.columns:
            raise QueryError(f"the query must select a traj_id column; it selects {relation.columns}")
        ids = relation.select("traj_id").to_arrow_table()["traj_id"].to_pylist()
    except duckdb.Error as exc:
        raise query_error(exc) from exc
    return list(dict.fromkeys(i for i in ids if i is not None))


def _load_batch(con: duckdb.DuckDBPyConnection, ids: list[str]) -> list[ScoredTrajectory]:
    """Full records for ``ids`` (in that order); ids missing from ``trajectories`` are skipped."""
    wanted = pa.table({"traj_id": pa.array(ids, pa.string())})
    con.register("_wanted", wanted)
    try:
        trajs = con.sql(
            "SELECT * FROM trajectories WHERE traj_id IN (SELECT traj_id FROM _wanted)"
        ).to_arrow_table()
        chunks = con.sql(
            "SELECT * FROM chunks WHERE traj_id IN (SELECT traj_id FROM _wanted) "
            "ORDER BY traj_id, chunk_index"
        ).to_arrow_table()
    finally:
        con.unregister("_wanted")
    by_traj = _chunks_by_traj(chunks)
    prompts = _packed(trajs["prompt_tokens"], TOKEN_DTYPE)
    rows = trajs.drop_columns(["prompt_tokens"]).to_pylist()
    loaded = {
        row["traj_id"]: _scored(row, prompt, by_traj.get(row["traj_id"], []))
        for row, prompt in zip(rows, prompts, strict=True)
    }
    return [loaded[i] for i in ids if i in loaded]


def iter_scored(root: Path, sql: str, *, batch_size: int = 256) -> Iterator[list[ScoredTrajectory]]:
    """Yield the trajectories ``sql`` selects, ``batch_size`` at a time, in the query's order.

    The query runs once (only its traj_ids are kept in memory); each batch then reads its
    trajectories and chunks from the lake. Raises ``QueryError`` for a query DuckDB refuses.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    con = open_lake(root)
    try:
        ids = _selected_ids(con, sql)
        for start in range(0, len(ids), batch_size):
            try:
                batch = _load_batch(con, ids[start : start + batch_size])
            except duckdb.Error as exc:
                raise query_error(exc) from exc
            if batch:
                yield batch
    finally:
        con.close()


def load_scored(root: Path, sql: str) -> list[ScoredTrajectory]:
    """Every trajectory ``sql`` selects (it must select ``traj_id``), rebuilt in full from the lake."""
    return [scored for batch in iter_scored(root, sql) for scored in batch]
