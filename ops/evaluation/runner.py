"""Attempts: K per task, each through the same agent loop, sandboxes and verifier as training
(``agent_harness.loop.run_episode``, ``consumers.reward.score``), but outside the training streams;
every attempt becomes an ``EvalRecord``.

``agent = "oracle"`` runs each task's reference solution instead of a model: its files are
written into the sandbox and its command runs where the agent's would, then the verifier decides.
A task whose oracle does not pass is broken (Terminal-Bench's own sanity check).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio
import msgspec
import structlog

from agent_harness.engine import InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from agent_harness.task_sandbox import create_options, exec_options
from agent_harness.tools import ToolsFor
from consumers.lake import EvalRecord
from consumers.reward import score
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError
from schemas.task import Task, TaskSample
from schemas.trajectory import ScoredTrajectory, Trajectory

log = structlog.get_logger(__name__)
Agent = Literal["policy", "oracle"]


@dataclass(frozen=True, slots=True)
class Plan:
    """One evaluation: who acts (``agent``, and for a policy its label and version), on which task
    set, how often, how many at once, and when an attempt counts as passed."""

    eval_id: str
    run: str
    task_set: str
    agent: Agent
    policy: str
    version: int
    k: int
    concurrency: int
    pass_threshold: float = 1.0
    verify_timeout_s: float = 60.0
    tool_format: str = "auto"  # the policy's tool-call format ([policy] tool_format)


async def oracle_episode(
    sample: TaskSample, sandbox: SandboxClient, command_cap_s: float
) -> tuple[Trajectory, str]:
    """Run the task's reference solution in a fresh sandbox; returns the (chunk-less) trajectory the
    verifier scores and a note with the solution's exit code and output."""
    task = sample.task
    started = time.time()
    sandbox_id, status, reason, note = "", "completed", "", ""
    try:
        created = await sandbox.create(
            task.environment, labels={"rollstream.eval": sample.msg_id[:60]}, **create_options(task)
        )
        sandbox_id = created.sandbox_id
        for cmd in task.setup:
            await sandbox.exec(sandbox_id, cmd, timeout_s=command_cap_s, **exec_options(task))
        assert task.oracle is not None
        for path, data in sorted(task.oracle.files.items()):
            await sandbox.write_file(sandbox_id, path, data, mode=0o755 if path.endswith(".sh") else 0o644)
        res = await sandbox.exec(
            sandbox_id,
            task.oracle.command,
            timeout_s=task.oracle.timeout_s,
            max_output_bytes=4096,
            **exec_options(task),
        )
        note = f"$ {task.oracle.command}\n[{res.exit_code}] {res.stdout}{res.stderr}"[-1500:]
        if res.timed_out:
            status, reason = "truncated", f"oracle timed out after {task.oracle.timeout_s:g}s"
    except SandboxError as exc:
        status, reason = "aborted", f"sandbox: {type(exc).__name__}: {exc}"
    traj = Trajectory(
        traj_id=sample.msg_id,
        run=sample.run,
        task_id=task.task_id,
        family=task.family,
        group_id=sample.group_id,
        sample_idx=sample.sample_idx,
        prompt_tokens=b"",
        chunks=[],
        status=status,  # type: ignore[arg-type]
        min_version=-1,
        max_version=-1,
        sandbox_id=sandbox_id,
        abort_reason=reason,
        started_at=started,
        finished_at=time.time(),
        task=task,
    )
    return traj, note


def record_of(
    plan: Plan, scored: ScoredTrajectory, attempt: int, wall_s: float, note: str = ""
) -> EvalRecord:
    """The ``evals`` row of one scored attempt."""
    traj = scored.traj
    action = sum(len(c.action_tokens) for c in traj.chunks) // 4
    obs = sum(len(c.obs_tokens) for c in traj.chunks) // 4
    output = f"{note}\n{scored.verifier_output}".strip() if note else scored.verifier_output
    return EvalRecord(
        eval_id=plan.eval_id,
        run=plan.run,
        task_set=plan.task_set,
        task_id=traj.task_id,
        attempt=attempt,
        agent=plan.agent,
        policy=plan.policy,
        policy_version=plan.version,
        reward=scored.reward,
        passed=scored.valid and scored.reward >= plan.pass_threshold,
        valid=scored.valid,
        status=traj.status,
        abort_reason=traj.abort_reason,
        invalid_reason=scored.invalid_reason,
        num_tokens=len(traj.prompt_tokens) // 4 + action + obs,
        num_action_tokens=action,
        turns=len(traj.chunks),
        wall_s=wall_s,
        verifier_output=output[-4000:],
        time=time.time(),
    )


def _no_oracle(plan: Plan, task: Task, attempt: int) -> EvalRecord:
    return EvalRecord(
        eval_id=plan.eval_id, run=plan.run, task_set=plan.task_set, task_id=task.task_id, attempt=attempt,
        agent=plan.agent, policy=plan.policy, policy_version=plan.version, reward=0.0, passed=False,
        valid=False, status="aborted", invalid_reason="the task has no reference solution", time=time.time(),
    )  # fmt: skip


async def attempt(
    plan: Plan,
    task: Task,
    index: int,
    *,
    sandbox: SandboxClient,
    engine: InferenceEngine | None,
    harness: HarnessSettings,
    tools_for: ToolsFor,
) -> EvalRecord:
    """One attempt of ``plan.agent`` at ``task``, verified; never raises for agent or sandbox failures."""
    if plan.agent == "oracle" and task.oracle is None:
        return _no_oracle(plan, task, index)
    sample = TaskSample(run=plan.run, task=task, sample_idx=index, created_at=time.time())
    started = time.monotonic()
    note = ""
    if plan.agent == "oracle":
        traj, note = await oracle_episode(sample, sandbox, harness.command_timeout_s)
    else:
        assert engine is not None
        registry = tools_for(task)
        traj = await run_episode(
            sample,
            engine=engine,
            sandbox=sandbox,
            settings=harness,
            registry=registry,
            tool_format=plan.tool_format,
        )
        traj = msgspec.structs.replace(traj, task=task)  # as the rollout worker does: the verifier reads it
    scored = await score(traj, sandbox, plan.verify_timeout_s, tools_for=tools_for)
    return record_of(plan, scored, index, time.monotonic() - started, note)


async def run_plan(
    plan: Plan,
    tasks: list[Task],
    *,
    sandbox: SandboxClient,
    engine: InferenceEngine | None,
    harness: HarnessSettings,
    tools_for: ToolsFor,
    on_record: Callable[[EvalRecord], None] | None = None,
) -> list[EvalRecord]:
    """``plan.k`` attempts at every task, ``plan.concurrency`` at once; records in task, attempt order."""
    limiter = anyio.CapacityLimiter(plan.concurrency)
    records: dict[tuple[int, int], EvalRecord] = {}

    async def one(i: int, task: Task, a: int) -> None:
        async with limiter:
            rec = await attempt(
                plan, task, a, sandbox=sandbox, engine=engine, harness=harness, tools_for=tools_for
            )
        records[(i, a)] = rec
        if on_record is not None:
            on_record(rec)
        log.debug("eval_attempt", task_id=rec.task_id, attempt=a, reward=rec.reward, valid=rec.valid)

    async with anyio.create_task_group() as tg:
        for i, task in enumerate(tasks):
            for a in range(plan.k):
                tg.start_soon(one, i, task, a)
    return [records[key] for key in sorted(records)]
