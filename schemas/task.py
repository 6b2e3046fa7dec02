"""Tasks and the per-sample work items on ``rs.tasks.<run>`` (producer -> rollout, lake)."""

from __future__ import annotations

from typing import Annotated

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
AbsPath = Annotated[str, msgspec.Meta(pattern=r"^/")]

# What imported tasks may carry in files (verifier plus reference solution): a task travels inside
# every TaskSample and Trajectory, under the broker's max_payload (1 MiB by default).
MAX_TASK_FILE_BYTES = 256 * 1024


class TaskResources(msgspec.Struct, frozen=True, kw_only=True, tag="task_resources.v1", tag_field="kind"):
    """What an imported task's sandbox needs; 0 or False keeps sandboxd's defaults. sandboxd refuses
    a value above its own upper bounds (``max_cpus``, ``max_memory_mb``, ``max_work_mb``)."""

    cpus: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    # A writable (copy-on-write) root filesystem, size-limited by sandboxd; /work and /tmp stay tmpfs.
    writable_root: bool = False
    work_mb: Annotated[int, msgspec.Meta(ge=0)] = 0  # size of the /work scratch mount


class Verifier(msgspec.Struct, frozen=True, kw_only=True, tag="verifier.v1", tag_field="kind"):
    """How an imported task is checked, after the agent's last command (Harbor's rule).

    The ``clear`` directories are emptied, then ``files`` (absolute sandbox path -> bytes) are written,
    then ``command`` runs as the verifier uid in the task's ``workdir`` (sandboxd's ``verify``). The
    reward is the first of ``reward_files`` that exists (``reward.txt``: one number;
    ``reward.json``: ``{"reward": x}`` or numbers whose mean is taken), else 1.0 if the command
    exits 0, else 0.0. With ``tests``, the command writes ``PASSED <id>`` / ``FAILED <id>`` lines
    to ``results_file`` instead, and the reward is 1.0 iff every ``fail_to_pass`` and every
    ``pass_to_pass`` test passed (SWE-style).
    The files never enter the sandbox before the episode ends, nor the prompt.
    """

    command: NonEmpty
    files: dict[AbsPath, bytes] = {}
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    clear: tuple[AbsPath, ...] = ("/tests", "/logs/verifier")
    reward_files: tuple[AbsPath, ...] = ("/logs/verifier/reward.txt", "/logs/verifier/reward.json")
    env: dict[str, str] = {}
    fail_to_pass: list[str] = []
    pass_to_pass: list[str] = []
    results_file: str = ""  # non-empty: per-test results decide the reward (SWE-style)


class Oracle(msgspec.Struct, frozen=True, kw_only=True, tag="oracle.v1", tag_field="kind"):
    """A task's reference solution: ``files`` written into the sandbox, then ``command`` run in the
    task's ``workdir`` as the agent would (``rollstream eval --agent oracle``)."""

    command: NonEmpty
    files: dict[AbsPath, bytes] = {}
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


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
    # Imported tasks (producers/families/harbor, swe): an explicit image tag (overrides
    # ``environment``), the agent's working directory, sandbox resources, the agent's time limit
    # (0: the harness's episode timeout), the verifier and the reference solution.
    image: str = ""
    workdir: AbsPath = "/work"
    resources: TaskResources = TaskResources()
    agent_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    verifier: Verifier | None = None
    oracle: Oracle | None = None


def task_files_bytes(task: Task) -> int:
    """Bytes of verifier and oracle files a task carries (bounded by ``MAX_TASK_FILE_BYTES``)."""
    parts = [task.verifier, task.oracle]
    return sum(len(data) for p in parts if p is not None for data in p.files.values())


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
