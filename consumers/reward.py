"""The reward group: raw trajectories in, scored trajectories out.

Verification runs the task's verify commands in the trajectory's own sandbox while it is alive,
through sandboxd's ``verify`` (the agent's processes are ended first; the commands run as another
uid; see docs/security.md); if it is gone, a fresh sandbox re-runs setup and the trajectory's bash
calls first. An agent failure scores 0.0; an infrastructure failure (aborted episode, sandbox lost
and not rebuildable, a verify command that hangs) is published with ``valid=False`` and its
reason, never trained on.
"""

from __future__ import annotations

import time

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ops import metrics
from ops.config import Config
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError, SandboxNotFound
from sandboxd.gem import step_command
from schemas.codec import raw_traj_decoder
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams.bus import Consumer, Delivery, Publisher, serve
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


async def _rebuild(sandbox: SandboxClient, traj: Trajectory, timeout_s: float, created_ids: list[str]) -> str:
    """A fresh sandbox with the task set up and the trajectory's bash calls re-executed (its id is
    appended to ``created_ids`` at once, so the caller closes it even if a later step fails)."""
    assert traj.task is not None
    created = await sandbox.create(traj.task.environment, labels={"rollstream.traj": traj.traj_id[:60]})
    created_ids.append(created.sandbox_id)
    for cmd in traj.task.setup:
        await sandbox.exec(created.sandbox_id, cmd, timeout_s=timeout_s)
    for chunk in traj.chunks:
        command = replay_command(chunk)
        if command:
            await sandbox.exec(created.sandbox_id, command, timeout_s=timeout_s)
    return created.sandbox_id


def replay_command(chunk: Chunk) -> str:
    """The shell command that re-executes a chunk's tool call (bash, or a GEM ``act`` step), or ""."""
    if chunk.tool_status not in ("ok", "error", "timeout") or chunk.tool_name not in ("bash", "act"):
        return ""
    try:
        args = msgspec.json.decode(chunk.tool_args)
    except msgspec.DecodeError:
        return ""
    if not isinstance(args, dict):
        return ""
    if chunk.tool_name == "act":
        return step_command(str(args.get("action", "")))
    return str(args.get("command", ""))


def _graded_reward(result: bytes | None, passed: bool) -> float:
    """1.0/0.0 from the verify commands, or the task's own graded reward when it writes one
    (GEM tasks: ``total_reward`` in the JSON file named by ``metadata["result_path"]``)."""
    if result is None:
        return 1.0 if passed else 0.0
    try:
        return float(msgspec.json.decode(result).get("total_reward", 1.0 if passed else 0.0))
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return 1.0 if passed else 0.0


async def score(traj: Trajectory, sandbox: SandboxClient, verify_timeout_s: float) -> ScoredTrajectory:
    """Verify one trajectory; never raises for agent or infrastructure failures."""

    def invalid(reason: str) -> ScoredTrajectory:
        return ScoredTrajectory(
            traj=traj, reward=0.0, valid=False, invalid_reason=reason, scored_at=time.time()
        )

    if traj.status == "aborted":
        return invalid(f"aborted: {traj.abort_reason}")
    if traj.task is None or not traj.task.verify:
        return invalid("no verify commands")
    sandbox_id = traj.sandbox_id
    rebuilt: list[str] = []
    try:
        try:
            if not sandbox_id:
                raise SandboxNotFound("no sandbox recorded")
            reward, out = await _run_checks(sandbox, sandbox_id, traj, verify_timeout_s)
        except SandboxNotFound:
            fresh = await _rebuild(sandbox, traj, verify_timeout_s, rebuilt)
            reward, out = await _run_checks(sandbox, fresh, traj, verify_timeout_s)
            out = "[re-executed in a fresh sandbox]\n" + out
    except InfraFailure as exc:
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


async def run(
    cfg: Config, js: JetStreamContext, nc: NATS, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Score trajectories from the shared ``reward`` consumer until cancelled."""
    consumer = await Consumer(js, REWARD, cfg.run, raw_traj_decoder).bind()
    pub = Publisher(js)
    sandbox = SandboxClient(nc)

    async def handle(d: Delivery[Trajectory]) -> None:
        scored = await score(d.record, sandbox, cfg.reward.verify_timeout_s)
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
