"""Tasks and the per-sample work items on ``rs.tasks.<run>`` (producer -> rollout, lake)."""

from __future__ import annotations

from typing import Annotated

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Task(msgspec.Struct, frozen=True, kw_only=True, tag="task.v1", tag_field="kind"):
    """One task: what the agent is asked, where it runs, and how success is checked.

    Nested in ``TaskSample`` and read from JSONL task files; the tag is optional on input (a record
    without ``kind`` decodes as ``task.v1``), so untagged task files keep working.
    """

    task_id: NonEmpty
    family: NonEmpty
    instruction: NonEmpty
    # EnvHub environment name; sandboxd maps it to a locally built image.
    environment: str = "base"
    # Shell commands run in the sandbox before the episode (as the agent's uid, cwd /work).
    setup: list[str] = []
    # Shell commands run by the verifier (sandboxd's verify: another uid, the agent ended first);
    # reward 1.0 when all exit 0, else 0.0.
    verify: list[str] = []
    group_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_turns: Annotated[int, msgspec.Meta(ge=1)] = 6
    difficulty: int = 1
    metadata: dict[str, str] = {}


class TaskSample(msgspec.Struct, frozen=True, kw_only=True, tag="task_sample.v1", tag_field="kind"):
    """One rollout to run: sample ``sample_idx`` of ``task`` (stable id: task_id + sample_idx)."""

    run: str
    task: Task
    sample_idx: int = 0
    # Set by chunk-level resampling: tool calls to replay before the policy takes over.
    prefix_calls: list[str] = []
    created_at: float = 0.0

    @property
    def msg_id(self) -> str:
        return f"{self.run}:{self.task.task_id}:{self.sample_idx}"

    @property
    def group_id(self) -> str:
        return f"{self.run}:{self.task.task_id}"
