"""The reward group: raw trajectories in, scored trajectories out.

The task a trajectory is verified with comes from the task registry (``streams.tasks``, written by
the producer before it published the task), looked up by the trajectory's ``task_id`` in this
worker's run: never the copy inside the raw trajectory, which the rollout side writes. A task the
registry does not hold gives ``valid=False`` with the reason. Every trajectory is also screened for
risky behaviour (``judge``): the sandbox is probed before verification (``consumers.probe``) and the
tool calls are matched by the text rules (``consumers.screen``); what they find goes into ``flags``
and ``flag_evidence``, and the learner drops or down-weights flagged samples (``learner.flagged``).

Verification runs the task's verify commands (an imported task's verifier: ``consumers.task_verify``,
its test files placed by sandboxd after the seal) in the trajectory's own sandbox while it is alive,
through sandboxd's ``verify`` (the agent's processes are ended first; the commands run as another
uid; see docs/security.md); if it is gone, a fresh sandbox re-runs setup and the commands of the
trajectory's tool calls first (as the task's tools, from ``tools_for``, ran them). An agent
failure scores 0.0; an infrastructure failure (aborted episode, sandbox lost and not rebuildable,
a verify command that hangs) is published with ``valid=False`` and its reason, never trained on.
"""

from __future__ import annotations

import time

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.task_sandbox import create_options, exec_options
from agent_harness.tools import ToolCall, ToolRegistry, ToolsFor, default_tools
from consumers import probe, screen
from consumers.metrics import REWARDS
from consumers.probe import ProbeSettings
from consumers.settings import RewardSettings
from consumers.task_verify import VerifierBroken, verify_task
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError, SandboxNotFound
from schemas.codec import raw_traj_decoder
from schemas.task import Task
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams import tasks as registry
from streams.bus import Consumer, Delivery, Publisher, heartbeat, serve
from streams.metrics import MESSAGES, track_dead_letters
from streams.topology import REWARD, subject

log = structlog.get_logger(__name__)


class InfraFailure(Exception):
    """Verification could not be carried out; the sample is not a training sample."""


async def _run_checks(
    sandbox: SandboxClient, sandbox_id: str, traj: Trajectory, timeout_s: float
) -> tuple[float, str]:
    """Verify through sandboxd's ``verify`` (the agent's processes are ended first, the commands run
    as the verifier uid, the sandbox is removed after); returns (reward, verifier output)."""
    assert traj.task is not None
    commands = list(traj.task.verify)
    path = traj.task.metadata.get("result_path", "")
    res = await sandbox.verify(
        sandbox_id, commands, timeout_s=timeout_s, max_output_bytes=4096, result_path=path
    )
    ran = list(zip(commands, res.results, strict=False))  # verify stops at the first failure
    outputs = [f"$ {cmd}\n[{r.exit_code}] {r.stdout}{r.stderr}" for cmd, r in ran]
    for cmd, r in ran:
        if r.timed_out:
            raise InfraFailure(f"verify command timed out after {timeout_s:.0f}s: {cmd[:80]}")
    return _graded_reward(res.result_data, res.passed), "\n".join(outputs)[-4000:]


async def _rebuild(
    sandbox: SandboxClient, traj: Trajectory, timeout_s: float, created_ids: list[str], tools: ToolRegistry
) -> str:
    """A fresh sandbox with the task set up and the trajectory's tool calls re-executed (its id is
    appended to ``created_ids`` at once, so the caller closes it even if a later step fails)."""
    assert traj.task is not None
    labels = {"rollstream.traj": traj.traj_id[:60]}
    created = await sandbox.create(traj.task.environment, labels=labels, **create_options(traj.task))
    created_ids.append(created.sandbox_id)
    opts = exec_options(traj.task)
    for cmd in traj.task.setup:
        await sandbox.exec(created.sandbox_id, cmd, timeout_s=timeout_s, **opts)
    for chunk in traj.chunks:
        command = replay_command(chunk, tools)
        if command:
            await sandbox.exec(created.sandbox_id, command, timeout_s=timeout_s, **opts)
    return created.sandbox_id


def replay_command(chunk: Chunk, tools: ToolRegistry) -> str:
    """The shell command that re-executes a chunk's tool call as ``tools`` ran it, or ""."""
    if chunk.tool_status not in ("ok", "error", "timeout") or not chunk.tool_name:
        return ""
    try:
        args = msgspec.json.decode(chunk.tool_args)
    except msgspec.DecodeError:
        return ""
    call = ToolCall(chunk.tool_name, args) if isinstance(args, dict) else None
    if call is None or tools.check(call) is not None:
        return ""
    return tools.command(call) or ""


def _graded_reward(result: bytes | None, passed: bool) -> float:
    """1.0/0.0 from the verify commands, or the task's own graded reward when it writes one
    (GEM tasks: ``total_reward`` in the JSON file named by ``metadata["result_path"]``)."""
    if result is None:
        return 1.0 if passed else 0.0
    try:
        return float(msgspec.json.decode(result).get("total_reward", 1.0 if passed else 0.0))
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return 1.0 if passed else 0.0


async def _check(
    sandbox: SandboxClient, sandbox_id: str, traj: Trajectory, timeout_s: float
) -> tuple[float, str]:
    """(reward, verifier output): an imported task's verifier, or the task's verify commands."""
    assert traj.task is not None
    if traj.task.verifier is not None:
        verdict = await verify_task(sandbox, sandbox_id, traj.task)
        return verdict.reward, verdict.output
    return await _run_checks(sandbox, sandbox_id, traj, timeout_s)


async def score(
    traj: Trajectory, sandbox: SandboxClient, verify_timeout_s: float, *, tools_for: ToolsFor = default_tools
) -> ScoredTrajectory:
    """Verify one trajectory; never raises for agent or infrastructure failures. ``tools_for`` gives
    the tools of its task (to re-execute its calls if its sandbox is gone)."""

    def invalid(reason: str) -> ScoredTrajectory:
        return ScoredTrajectory(
            traj=traj, reward=0.0, valid=False, invalid_reason=reason, scored_at=time.time()
        )

    if traj.status == "aborted":
        return invalid(f"aborted: {traj.abort_reason}")
    if traj.task is None or not (traj.task.verify or traj.task.verifier):
        return invalid("no verify commands")
    sandbox_id = traj.sandbox_id
    rebuilt: list[str] = []
    try:
        try:
            if not sandbox_id:
                raise SandboxNotFound("no sandbox recorded")
            reward, out = await _check(sandbox, sandbox_id, traj, verify_timeout_s)
        except SandboxNotFound:
            if traj.source == "proxy":  # an external agent's commands are not its chunks' tool calls
                return invalid("sandbox lost: an external agent's episode cannot be re-executed")
            fresh = await _rebuild(sandbox, traj, verify_timeout_s, rebuilt, tools_for(traj.task))
            reward, out = await _check(sandbox, fresh, traj, verify_timeout_s)
            out = "[re-executed in a fresh sandbox]\n" + out
    except (InfraFailure, VerifierBroken) as exc:
        return invalid(str(exc))
    except SandboxError as exc:
        return invalid(f"sandbox: {type(exc).__name__}: {exc}")
    finally:
        with anyio.move_on_after(10, shield=True):
            for sid in rebuilt:  # verify removed the sandboxes it reached; these, unless it failed first
                try:
                    await sandbox.close(sid)
                except SandboxError:
                    pass
    return ScoredTrajectory(traj=traj, reward=reward, verifier_output=out, scored_at=time.time())


def _invalid(traj: Trajectory, reason: str) -> ScoredTrajectory:
    return ScoredTrajectory(traj=traj, reward=0.0, valid=False, invalid_reason=reason, scored_at=time.time())


async def behaviour(
    sandbox: SandboxClient, traj: Trajectory, settings: ProbeSettings | None
) -> list[screen.Finding]:
    """What the probe sees in the trajectory's sandbox after the episode: nothing when probing is
    off or sandboxd cannot reach the sandbox (verification then decides); a probe that ran but
    gave no complete report (what the agent left behind broke it: no pids left, killed, garbled)
    is itself a finding."""
    if settings is None or not settings.enabled or not traj.sandbox_id or traj.status == "aborted":
        return []
    try:
        return await probe.run_probe(sandbox, traj.sandbox_id, settings)
    except SandboxError as exc:
        log.info("probe_unavailable", traj_id=traj.traj_id, error=str(exc)[:200])
        return []
    except probe.ProbeError as exc:
        log.warning("probe_failed", traj_id=traj.traj_id, error=str(exc)[:200])
        return [screen.Finding("leftover_process", "probe", f"the probe could not run: {exc}")]


async def judge(
    traj: Trajectory,
    task: Task,
    sandbox: SandboxClient,
    verify_timeout_s: float,
    *,
    tools_for: ToolsFor = default_tools,
    probe_settings: ProbeSettings | None = None,
) -> ScoredTrajectory:
    """Score ``traj`` as an episode of ``task`` (the authoritative copy: from the registry, or from
    a trusted in-process caller that made the task) and screen it: probe the sandbox, verify, match
    the tool calls. An embedded task that differs from ``task`` is flagged ``forged_task``."""
    found: list[screen.Finding] = []
    if traj.task is not None and traj.task != task:
        found.append(
            screen.Finding("forged_task", "task", f"the trajectory's copy of {task.task_id} differs")
        )
    traj = msgspec.structs.replace(traj, task=task)
    found += await behaviour(sandbox, traj, probe_settings)  # before verification ends the agent
    scored = await score(traj, sandbox, verify_timeout_s, tools_for=tools_for)
    found += await anyio.to_thread.run_sync(screen.screen_calls, traj.chunks)
    flags, evidence = screen.flags_of(found)
    return msgspec.structs.replace(scored, flags=flags, flag_evidence=evidence)


async def judge_raw(
    traj: Trajectory,
    js: JetStreamContext,
    run: str,
    sandbox: SandboxClient,
    verify_timeout_s: float,
    *,
    tools_for: ToolsFor = default_tools,
    probe_settings: ProbeSettings | None = None,
) -> ScoredTrajectory:
    """A raw trajectory from ``run``'s stream, judged with its task from the registry."""
    bare = msgspec.structs.replace(traj, task=None)  # an unverifiable record keeps no task copy
    if traj.run != run:
        return _invalid(bare, f"a trajectory of run {traj.run!r} arrived on run {run!r}")
    try:
        task = await registry.lookup(js, run, traj.task_id)
    except registry.RegistryCorrupt as exc:
        return _invalid(bare, str(exc))
    if task is None:
        return _invalid(
            bare,
            f"task {traj.task_id!r} is not in the task registry: only tasks a producer published are scored",
        )
    return await judge(
        traj, task, sandbox, verify_timeout_s, tools_for=tools_for, probe_settings=probe_settings
    )


async def run(
    settings: RewardSettings,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    tools_for: ToolsFor = default_tools,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Score trajectories of run ``run`` from the shared ``reward`` consumer until cancelled."""
    consumer = await Consumer(js, REWARD, run, raw_traj_decoder).bind()
    pub = Publisher(js)
    sandbox = SandboxClient(nc)

    async def handle(d: Delivery[Trajectory]) -> None:
        async with anyio.create_task_group() as tg:  # the ack wait follows this heartbeat
            tg.start_soon(heartbeat, d, settings.heartbeat_s)
            scored = await judge_raw(
                d.record,
                js,
                run,
                sandbox,
                settings.verify_timeout_s,
                tools_for=tools_for,
                probe_settings=settings.probe,
            )
            await pub.publish(subject("scored", run), scored, msg_id=f"scored:{d.record.traj_id}")
            tg.cancel_scope.cancel()
        await d.ack()
        outcome = "invalid" if not scored.valid else "success" if scored.reward > 0 else "failure"
        REWARDS.labels(run=run, outcome=outcome).inc()
        if scored.flags:
            log.info(
                "trajectory_flagged",
                traj_id=d.record.traj_id,
                flags=scored.flags,
                evidence=scored.flag_evidence,
            )
        MESSAGES.labels(worker="reward", run=run).inc()

    task_status.started()
    log.info("reward_started", concurrency=settings.concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(track_dead_letters, consumer, "reward", run)
        await serve(consumer, settings.concurrency, handle)
