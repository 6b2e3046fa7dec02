"""Chunk-level initialised resampling: restart rollouts at the K-th chunk of chosen trajectories.

For each trajectory a SQL query selects, a new task is made whose ``TaskSample.prefix_calls`` are
the trajectory's first ``K`` tool calls. The harness (``agent_harness.loop._replay_prefix``)
re-executes them in a fresh sandbox after the task's setup and folds calls and observations into
the prompt, so the policy starts acting at chunk ``K`` of a known-good path. The new task has its
own id (``<task_id>.k<K>.<hash of the source traj_id>.<nonce>``), so its trajectories never
collide with the source's in the lake or the learner, and carries ``resampled_from`` and
``from_chunk`` in its metadata; its ``samples`` samples form one group (a group baseline compares
restarts from the same point). New tasks go into the task registry (``streams.tasks``) before
their samples, as the producer's do: the reward group verifies only registered tasks.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext

from agent_harness.tools import format_tool_call
from consumers.lake import iter_scored
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory
from streams.bus import Publisher
from streams.tasks import publish_samples

log = structlog.get_logger(__name__)
_args_decoder = msgspec.json.Decoder()


class ResampleError(ValueError):
    """A trajectory cannot be restarted at the requested chunk (the reason says why)."""


def prefix_calls(scored: ScoredTrajectory, k: int) -> list[str]:
    """The canonical text of the first ``k`` chunks' tool calls.

    Raises ``ResampleError`` if the trajectory has no chunk after them (nothing left to resample),
    or if one of them is not a well-formed call (a parse error cannot be re-executed).
    """
    chunks = scored.traj.chunks
    if k < 1:
        raise ResampleError("from_chunk must be at least 1")
    if len(chunks) <= k:
        raise ResampleError(f"it has {len(chunks)} chunks, so there is no chunk {k} to restart at")
    calls: list[str] = []
    for chunk in chunks[:k]:
        if not chunk.tool_name or chunk.tool_status == "parse_error":
            raise ResampleError(f"chunk {chunk.index} has no well-formed tool call to re-execute")
        try:
            arguments = _args_decoder.decode(chunk.tool_args or "{}")
        except msgspec.DecodeError as exc:
            raise ResampleError(f"chunk {chunk.index} has arguments that are not JSON: {exc}") from exc
        if not isinstance(arguments, dict):
            raise ResampleError(f"chunk {chunk.index} has arguments that are not an object")
        calls.append(format_tool_call(chunk.tool_name, arguments))
    return calls


def resample_samples(
    scored: ScoredTrajectory, k: int, *, run: str, samples: int = 1, nonce: str = "", now: float = 0.0
) -> list[TaskSample]:
    """The task samples that restart ``scored`` at chunk ``k`` (``samples`` of them, one group)."""
    task = scored.traj.task
    if task is None:
        raise ResampleError("the lake has no task for it (Trajectory.task is unset)")
    calls = prefix_calls(scored, k)
    digest = hashlib.sha1(scored.traj.traj_id.encode()).hexdigest()[:8]
    task_id = f"{task.task_id}.k{k}.{digest}" + (f".{nonce}" if nonce else "")
    metadata = {**task.metadata, "resampled_from": scored.traj.traj_id, "from_chunk": str(k)}
    new_task = msgspec.structs.replace(task, task_id=task_id, group_size=samples, metadata=metadata)
    created = now or time.time()
    return [
        TaskSample(run=run, task=new_task, sample_idx=i, prefix_calls=calls, created_at=created)
        for i in range(samples)
    ]


@dataclass
class ResampleResult:
    published: int = 0  # task samples published
    trajectories: int = 0  # source trajectories restarted
    skipped: dict[str, str] | None = None  # traj_id -> why it could not be restarted


async def resample(
    js: JetStreamContext,
    root: Path,
    sql: str,
    *,
    run: str,
    from_chunk: int,
    samples: int = 1,
    nonce: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ResampleResult:
    """Publish restart samples for every trajectory ``sql`` selects to ``rs.tasks.<run>``."""
    nonce = nonce or secrets.token_hex(4)
    pub = Publisher(js)
    result = ResampleResult(skipped={})
    batches: Iterator[list[ScoredTrajectory]] = iter_scored(root, sql, batch_size=64)
    while (batch := await anyio.to_thread.run_sync(next, batches, None)) is not None:
        for scored in batch:
            try:
                made = resample_samples(scored, from_chunk, run=run, samples=samples, nonce=nonce)
            except ResampleError as exc:
                assert result.skipped is not None
                result.skipped[scored.traj.traj_id] = str(exc)
                continue
            result.published += await publish_samples(js, pub, made)  # registered, then published
            result.trajectories += 1
        if on_progress is not None:
            on_progress(len(batch))
    log.info(
        "resample_published",
        run=run,
        from_chunk=from_chunk,
        samples=result.published,
        skipped=len(result.skipped or {}),
    )
    return result
