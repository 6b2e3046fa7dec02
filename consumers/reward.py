"""The reward group: raw trajectories in, scored trajectories out.

Verification runs the task's verify commands in the trajectory's own sandbox while it is alive;
if it is gone, a fresh sandbox re-runs setup and the commands of the trajectory's tool calls first
(as the task's tools, from ``tools_for``, ran them). An agent failure scores 0.0; an
infrastructure failure (aborted episode, sandbox lost and not rebuildable, a verify command that
hangs) is published with ``valid=False`` and its reason, never trained on.
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
from consumers.task_verify import VerifierBroken, verify_task
from ops import metrics
from ops.config import Config
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError, SandboxNotFound
from schemas.codec import raw_traj_decoder
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams.bus import Consumer, Delivery, Publisher, serve
from streams.topology import REWARD, subject

log = structlog.get_logger(__name__)


class InfraFailure(Exception):
    """Verification could not be carried out; the sample is not a training sample."""


async def _run_checks(
    sandbox: SandboxClient, sandbox_id: str, commands: list[str], timeout_s: float
) -> tuple[bool, str]:
    outputs: list[str] = []
    for cmd in commands:
        res = await sandbox.exec(sandbox_id, cmd, timeout_s=timeout_s, max_output_bytes=4096)
        if res.timed_out:
            raise InfraFailure(f"verify command timed out after {timeout_s:.0f}s: {cmd[:80]}")
        outputs.append(f"$ {cmd}\n[{res.exit_code}] {res.stdout}{res.stderr}")
        if res.exit_code != 0:
            return False, "\n".join(outputs)[-4000:]
    return True, "\n".join(outputs)[-4000:]


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


async def _graded_reward(sandbox: SandboxClient, sandbox_id: str, traj: Trajectory, passed: bool) -> float:
    """1.0/0.0 from the verify commands, or the task's own graded reward when it writes one
    (GEM tasks: ``total_reward`` in the JSON file named by ``metadata["result_path"]``)."""
    path = traj.task.metadata.get("result_path", "") if traj.task else ""
    if not path:
        return 1.0 if passed else 0.0
    try:
        result = msgspec.json.decode(await sandbox.read_file(sandbox_id, path))
        return float(result.get("total_reward", 1.0 if passed else 0.0))
    except (SandboxError, msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return 1.0 if passed else 0.0


async def _check(
    sandbox: SandboxClient, sandbox_id: str, traj: Trajectory, timeout_s: float
) -> tuple[float, str]:
    """(reward, verifier output): an imported task's verifier, or the task's verify commands."""
    assert traj.task is not None
    if traj.task.verifier is not None:
        verdict = await verify_task(sandbox, sandbox_id, traj.task)
        return verdict.reward, verdict.output
    ok, out = await _run_checks(sandbox, sandbox_id, traj.task.verify, timeout_s)
    return await _graded_reward(sandbox, sandbox_id, traj, ok), out


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
            fresh = await _rebuild(sandbox, traj, verify_timeout_s, rebuilt, tools_for(traj.task))
            reward, out = await _check(sandbox, fresh, traj, verify_timeout_s)
            out = "[re-executed in a fresh sandbox]\n" + out
    except (InfraFailure, VerifierBroken) as exc:
        return invalid(str(exc))
    except SandboxError as exc:
        return invalid(f"sandbox: {type(exc).__name__}: {exc}")
    finally:
        with anyio.move_on_after(10, shield=True):
            for sid in {sandbox_id, *rebuilt} - {""}:
                try:
                    await sandbox.close(sid)
                except SandboxError:
                    pass
    return ScoredTrajectory(traj=traj, reward=reward, verifier_output=out, scored_at=time.time())


async def run(
    cfg: Config,
    js: JetStreamContext,
    nc: NATS,
    *,
    tools_for: ToolsFor = default_tools,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Score trajectories from the shared ``reward`` consumer until cancelled."""
    consumer = await Consumer(js, REWARD, cfg.run, raw_traj_decoder).bind()
    pub = Publisher(js)
    sandbox = SandboxClient(nc)

    async def handle(d: Delivery[Trajectory]) -> None:
        scored = await score(d.record, sandbox, cfg.reward.verify_timeout_s, tools_for=tools_for)
        await pub.publish(subject("scored", cfg.run), scored, msg_id=f"scored:{d.record.traj_id}")
        await d.ack()
        outcome = "invalid" if not scored.valid else "success" if scored.reward > 0 else "failure"
        metrics.REWARDS.labels(run=cfg.run, outcome=outcome).inc()
        metrics.MESSAGES.labels(worker="reward", run=cfg.run).inc()

    task_status.started()
    log.info("reward_started", concurrency=cfg.reward.concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(metrics.track_dead_letters, consumer, "reward", cfg.run)
        await serve(consumer, cfg.reward.concurrency, handle)
