"""The lake's tables, declared once: Arrow schema, view key and compaction key of each.

Every writer, view, reader, compaction and document (docs/lake.md, checked by a test) follows
these declarations. Timestamps are float64 seconds since the Unix epoch (as on the wire), so they
round-trip exactly. Every view adds ``date`` (DATE) from the partition path.
"""

from __future__ import annotations

import msgspec
import pyarrow as pa

TOKENS = pa.list_(pa.int32())
LOGPROBS = pa.list_(pa.float32())
STRINGS = pa.list_(pa.string())

TRAJECTORIES = pa.schema(
    [
        ("traj_id", pa.string()),
        ("run", pa.string()),
        ("task_id", pa.string()),
        ("family", pa.string()),
        ("group_id", pa.string()),
        ("sample_idx", pa.int64()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("abort_reason", pa.string()),
        ("reward", pa.float64()),
        ("chunk_rewards", pa.list_(pa.float64())),
        ("valid", pa.bool_()),
        ("invalid_reason", pa.string()),
        ("replay", pa.bool_()),
        ("replay_mode", pa.string()),
        ("flags", STRINGS),
        ("num_chunks", pa.int32()),
        ("num_action_tokens", pa.int64()),
        ("num_tokens", pa.int64()),
        ("min_version", pa.int64()),
        ("max_version", pa.int64()),
        ("policy_version", pa.int64()),
        ("sandbox_id", pa.string()),
        ("sandbox_owner", pa.string()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
        ("scored_at", pa.float64()),
        ("verifier_output", pa.string()),
        ("prompt_tokens", TOKENS),
        ("task", pa.string()),  # JSON of Trajectory.task (the Task it ran), null when absent
        ("resumed", pa.int64()),
    ]
)

CHUNKS = pa.schema(
    [
        ("traj_id", pa.string()),
        ("run", pa.string()),
        ("chunk_index", pa.int32()),
        ("policy_version", pa.int64()),
        ("tool_name", pa.string()),
        ("tool_args", pa.string()),
        ("tool_status", pa.string()),
        ("action_tokens", TOKENS),
        ("action_logprobs", LOGPROBS),
        ("obs_tokens", TOKENS),
        ("obs_text", pa.string()),
        ("gen_ms", pa.float64()),
        ("tool_ms", pa.float64()),
        ("num_action_tokens", pa.int32()),
        ("context_tokens", TOKENS),  # non-empty: the chunk starts a new segment (history edited)
    ]
)

# Chunks of episodes as they are made (rs.traj.chunks.<run>.*, consumers.durable), before their
# trajectory is scored: an episode in flight has rows here and none in trajectories.
CHUNKS_LIVE = pa.schema(
    [
        ("traj_id", pa.string()),
        ("run", pa.string()),
        ("task_id", pa.string()),
        ("sample_idx", pa.int64()),
        ("chunk_index", pa.int32()),
        ("policy_version", pa.int64()),
        ("tool_name", pa.string()),
        ("tool_status", pa.string()),
        ("num_action_tokens", pa.int32()),
        ("final", pa.string()),
        ("sandbox_id", pa.string()),
        ("attempt", pa.int64()),
        ("resumed", pa.int64()),
        ("time", pa.float64()),
    ]
)

TRAIN_LOG = pa.schema(
    [
        ("run", pa.string()),
        ("traj_id", pa.string()),
        ("task_id", pa.string()),
        ("fate", pa.string()),
        ("reason", pa.string()),
        ("learner_version", pa.int64()),
        ("min_version", pa.int64()),
        ("staleness", pa.int64()),
        ("max_staleness", pa.int64()),
        ("step", pa.int64()),
        ("reward", pa.float64()),
        ("source", pa.string()),
        ("loss", pa.float64()),
        ("time", pa.float64()),
        ("detail", pa.string()),
    ]
)

TRAIN_STEPS = pa.schema(
    [
        ("run", pa.string()),
        ("step", pa.int64()),
        ("version", pa.int64()),
        ("loss", pa.float64()),
        ("samples", pa.int64()),
        ("dropped", pa.int64()),
        ("mean_reward", pa.float64()),
        ("mean_ratio", pa.float64()),
        ("masked_fraction", pa.float64()),
        ("grad_norm", pa.float64()),
        ("time", pa.float64()),
        ("filtered_groups", pa.int64()),
        ("wait_s", pa.float64()),
        ("busy_s", pa.float64()),
    ]
)

TASKS = pa.schema(
    [
        ("run", pa.string()),
        ("task_id", pa.string()),
        ("sample_idx", pa.int64()),
        ("family", pa.string()),
        ("instruction", pa.string()),
        ("environment", pa.string()),
        ("setup", STRINGS),
        ("verify", STRINGS),
        ("difficulty", pa.int64()),
        ("group_size", pa.int64()),
        ("max_turns", pa.int64()),
        ("metadata", pa.map_(pa.string(), pa.string())),
        ("prefix_calls", STRINGS),
        ("created_at", pa.float64()),
    ]
)

# One verdict of one filter stage (ops.filters) on one trajectory.
FILTERS = pa.schema(
    [
        ("traj_id", pa.string()),
        ("run", pa.string()),
        ("stage", pa.string()),
        ("verdict", pa.string()),
        ("reasons", STRINGS),
        ("time", pa.float64()),
    ]
)

# One attempt of `rollstream eval` (ops/evaluation) at one task: its policy version, reward, cost.
EVALS = pa.schema(
    [
        ("eval_id", pa.string()),
        ("run", pa.string()),
        ("task_set", pa.string()),
        ("task_id", pa.string()),
        ("attempt", pa.int64()),
        ("agent", pa.string()),
        ("policy", pa.string()),
        ("policy_version", pa.int64()),
        ("reward", pa.float64()),
        ("passed", pa.bool_()),
        ("valid", pa.bool_()),
        ("status", pa.string()),
        ("abort_reason", pa.string()),
        ("invalid_reason", pa.string()),
        ("num_tokens", pa.int64()),
        ("num_action_tokens", pa.int64()),
        ("turns", pa.int64()),
        ("wall_s", pa.float64()),
        ("verifier_output", pa.string()),
        ("time", pa.float64()),
    ]
)

# File schemas per table.
SCHEMAS: dict[str, pa.Schema] = {
    "trajectories": TRAJECTORIES,
    "chunks": CHUNKS,
    "chunks_live": CHUNKS_LIVE,
    "train_log": TRAIN_LOG,
    "train_steps": TRAIN_STEPS,
    "tasks": TASKS,
    "filters": FILTERS,
    "evals": EVALS,
}
# Chunks are made durable before trajectories, so a visible trajectory row always has its chunks.
FLUSH_ORDER = (
    "chunks_live",
    "chunks",
    "trajectories",
    "tasks",
    "train_log",
    "train_steps",
    "filters",
    "evals",
)

# Which rows are copies of one record (redelivery, a rewritten part), and which copy a view keeps:
# (PARTITION BY keys, ORDER BY of the copy kept first).
# trajectories: a replayed copy (replay=true, same traj_id) never hides the original.
# train_steps: a step redone after a learner restart keeps its latest account.
DEDUPE: dict[str, tuple[str, str]] = {
    "trajectories": ("traj_id", "replay, scored_at, filename"),
    "chunks": ("traj_id, chunk_index", "filename"),
    "chunks_live": ("traj_id, chunk_index", "time, filename"),
    "train_log": ("run, traj_id, step, fate, source", "time, filename"),
    "train_steps": ("run, step", "time DESC, filename DESC"),
    "tasks": ("run, task_id, sample_idx", "created_at, filename"),
    "filters": ("traj_id, stage", "time DESC, filename DESC"),
    "evals": ("eval_id, task_id, attempt", "time, filename"),
}

# What makes two rows copies of one *message* (a redelivery), which compaction may merge. Wider
# than the view keys where a view hides distinct records (a replayed copy, a redone step, a newer
# verdict): compaction removes only true copies and never changes what a view shows.
COMPACT_KEYS: dict[str, tuple[str, str]] = {
    "trajectories": ("traj_id, replay, replay_mode", "scored_at, filename"),
    "chunks": ("traj_id, chunk_index", "filename"),
    "chunks_live": ("traj_id, chunk_index", "time, filename"),
    "train_log": ("run, traj_id, step, fate, source", "time, filename"),
    "train_steps": ("run, step, time", "filename"),
    "tasks": ("run, task_id, sample_idx, created_at", "filename"),
    "filters": ("traj_id, stage, time", "filename"),
    "evals": ("eval_id, task_id, attempt, time", "filename"),
}

_SIMPLE_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.float32(): "FLOAT",
    pa.bool_(): "BOOLEAN",
    pa.date32(): "DATE",
}


def duckdb_type(arrow_type: pa.DataType) -> str:
    """The DuckDB SQL type of an Arrow type used by the lake schemas."""
    if arrow_type in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[arrow_type]
    if pa.types.is_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    if pa.types.is_map(arrow_type):
        return f"MAP({duckdb_type(arrow_type.key_type)}, {duckdb_type(arrow_type.item_type)})"
    raise TypeError(f"no DuckDB type for {arrow_type}")


class FilterVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """A filter stage's verdict on one trajectory (a ``filters`` row; lake-only, never on the wire)."""

    traj_id: str
    run: str
    stage: str  # "heuristic" | "reverify" | "security"
    verdict: str  # "pass" | "flag" | "fail"
    reasons: list[str] = []
    time: float = 0.0


class EvalRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of an evaluation (an ``evals`` row; lake-only, never on the wire). ``agent`` is
    ``policy`` or ``oracle`` (the task's reference solution; ``policy_version`` -1)."""

    eval_id: str
    run: str
    task_set: str
    task_id: str
    attempt: int
    agent: str
    policy: str
    policy_version: int
    reward: float
    passed: bool
    valid: bool = True
    status: str = ""
    abort_reason: str = ""
    invalid_reason: str = ""
    num_tokens: int = 0
    num_action_tokens: int = 0
    turns: int = 0
    wall_s: float = 0.0
    verifier_output: str = ""
    time: float = 0.0
