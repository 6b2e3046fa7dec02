"""The state of one episode and its sandbox calls (used by ``agent_harness.loop``).

``Journal`` and ``Resume`` are the two hooks that make episodes durable (``consumers.durable``):
the journal records every chunk as it is made, and a resume restarts a redelivered task's episode
from what was recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog

from agent_harness.settings import HarnessSettings
from agent_harness.task_sandbox import create_options, exec_options
from agent_harness.tools import ParseError, ToolCall, ToolRegistry
from sandboxd.errors import SandboxCapacity
from schemas.sandbox import Created, ExecResult
from schemas.task import Task, TaskSample
from schemas.trajectory import Chunk, ToolStatus, TrajStatus

log = structlog.get_logger(__name__)


class SandboxAPI(Protocol):
    """The part of ``sandboxd.client.SandboxClient`` the loop uses."""

    async def create(
        self,
        environment: str = "base",
        *,
        labels: dict[str, str] = ...,
        ttl_s: float = ...,
        image: str = ...,
        cpus: float | None = ...,
        memory_mb: int | None = ...,
        writable_root: bool = ...,
        work_mb: int = ...,
        model_socket: bool = ...,
    ) -> Created: ...

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = ...,
        cwd: str = ...,
        max_output_bytes: int = ...,
    ) -> ExecResult: ...

    async def close(self, sandbox_id: str) -> None: ...


class SandboxFailed(Exception):
    """A sandbox operation failed (the infrastructure, not the policy): the episode is aborted."""


class Journal(Protocol):
    """Where an episode makes itself durable as it goes (``consumers.durable``): sandboxes it
    creates live ``lease_s`` unless their owner keeps them alive, and every chunk is recorded
    once its tool call returned."""

    @property
    def lease_s(self) -> float: ...

    async def sandbox_created(self, created: Created) -> None: ...

    async def chunk_made(
        self, chunk: Chunk, *, prompt: list[int], final: TrajStatus | None, abort_reason: str
    ) -> None: ...


@dataclass(frozen=True)
class Resume:
    """Where a redelivered task's episode goes on: its recorded prompt and chunks (the exact token
    prefix, each chunk with its original policy version), and the live sandbox to reattach to
    ("" when it is gone: the recorded tool calls are replayed into a fresh one). ``final`` is set
    when the recorded chunks already ended the episode."""

    prompt: list[int]
    chunks: list[Chunk]
    sandbox_id: str = ""
    sandbox_owner: str = ""
    final: TrajStatus | None = None
    abort_reason: str = ""
    started_at: float = 0.0
    resumed: int = 1


@dataclass
class Episode:
    seq: list[int]
    chunks: list[Chunk] = field(default_factory=list)
    status: TrajStatus = "truncated"
    abort_reason: str = ""
    sandbox_id: str = ""
    sandbox_owner: str = ""
    exec_opts: dict[str, Any] = field(default_factory=dict)  # the task's cwd, if not /work
    prompt_len: int = 0
    journal: Journal | None = None

    async def record(self, final: bool) -> None:
        """Make the last chunk durable (the journal's), with the episode's status if it ended it."""
        if self.journal is not None:
            await self.journal.chunk_made(
                self.chunks[-1],
                prompt=self.seq[: self.prompt_len] if self.chunks[-1].index == 0 else [],
                final=self.status if final else None,
                abort_reason=self.abort_reason if final else "",
            )


async def create_waiting(
    sandbox: SandboxAPI,
    task: Task,
    labels: dict[str, str],
    settings: HarnessSettings,
    ttl_s: float,
    **extra: Any,
) -> Created:
    """Create a sandbox; while sandboxd is at capacity (its sandboxes wait for verification), wait
    with backoff up to ``sandbox_wait_s``: back-pressure on the rollout, not an aborted episode."""
    deadline = time.monotonic() + settings.sandbox_wait_s
    pause = 0.1
    while True:
        try:
            return await sandbox.create(
                task.environment, labels=labels, ttl_s=ttl_s, **create_options(task), **extra
            )
        except SandboxCapacity as exc:
            if time.monotonic() + pause > deadline:
                raise SandboxFailed(f"create failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise SandboxFailed(f"create failed: {type(exc).__name__}: {exc}") from exc
        await anyio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def start_sandbox(
    sample: TaskSample, sandbox: SandboxAPI, settings: HarnessSettings, ep: Episode
) -> None:
    """The episode's sandbox (its lease as TTL when journalled), set up as the task says."""
    ttl_s = (
        ep.journal.lease_s if ep.journal is not None and ep.journal.lease_s > 0 else settings.sandbox_ttl_s
    )
    created = await create_sandbox(sample, sandbox, settings, ttl_s=ttl_s)
    ep.sandbox_id, ep.sandbox_owner = created.sandbox_id, created.owner
    if ep.journal is not None:
        await ep.journal.sandbox_created(created)
    await setup_sandbox(sample, sandbox, ep.sandbox_id, settings)


async def create_sandbox(
    sample: TaskSample,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    *,
    ttl_s: float | None = None,
    **extra: Any,
) -> Created:
    """The episode's sandbox, labelled with its run and trajectory (waits for a free slot); ``extra``
    create options beyond the task's (``model_socket``)."""
    labels = {"rollstream.run": sample.run, "rollstream.traj": sample.msg_id}
    ttl = settings.sandbox_ttl_s if ttl_s is None else ttl_s
    return await create_waiting(sandbox, sample.task, labels, settings, ttl, **extra)


async def setup_sandbox(
    sample: TaskSample, sandbox: SandboxAPI, sandbox_id: str, settings: HarnessSettings
) -> None:
    """Run the task's setup commands; a failing one raises ``SandboxFailed``."""
    opts = exec_options(sample.task)
    for command in sample.task.setup:
        result = await exec_in(sandbox, sandbox_id, command, settings.command_timeout_s, opts)
        if result.exit_code != 0 or result.timed_out:
            raise SandboxFailed(
                f"setup command failed ({result.exit_code}): {command}: {result.stderr[:200]}"
            )


async def exec_in(
    sandbox: SandboxAPI, sandbox_id: str, command: str, timeout_s: float, opts: dict[str, Any] | None = None
) -> ExecResult:
    try:
        return await sandbox.exec(sandbox_id, command, timeout_s=timeout_s, **(opts or {}))
    except Exception as exc:
        raise SandboxFailed(f"exec failed: {type(exc).__name__}: {exc}") from exc


async def act(
    call: ToolCall | ParseError,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    ep: Episode,
) -> tuple[ToolStatus, str, bool]:
    """Execute a parsed call; returns its status, the whole observation text, and whether the
    episode ends after it."""
    if isinstance(call, ParseError):
        return "parse_error", f"error: {call.message}", False

    async def run(command: str) -> ExecResult:
        return await exec_in(sandbox, ep.sandbox_id, command, settings.command_timeout_s, ep.exec_opts)

    outcome = await registry.execute(call, run, timeout_s=settings.command_timeout_s)
    return outcome.status, outcome.text, outcome.done


async def finish(sandbox: SandboxAPI, registry: ToolRegistry, ep: Episode, settings: HarnessSettings) -> None:
    """The registry's end-of-episode command, if any (best effort: the trajectory is already made,
    and a dead sandbox has nothing left to stop)."""
    command = registry.finish_command()
    if command is None or not ep.sandbox_id:
        return
    with anyio.move_on_after(settings.command_timeout_s):
        try:
            await sandbox.exec(ep.sandbox_id, command, timeout_s=settings.command_timeout_s, **ep.exec_opts)
        except Exception as exc:  # noqa: BLE001 - best effort, logged
            log.debug("episode_finish_failed", sandbox_id=ep.sandbox_id, error=str(exc)[:200])
