"""Sandbox helpers on the real Docker engine: test settings for sandboxd, a daemon run for the
length of a block, its containers, and episodes verified in the sandbox they ran in."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiodocker
import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from agent_harness.engine import InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from producers.families.files import FilesExpert, builtin_tasks
from sandboxd import daemon
from sandboxd.client import SandboxClient
from sandboxd.docker_ops import LABEL_OWNER
from sandboxd.settings import SandboxdSettings
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory, Trajectory

T = TypeVar("T")
EXPERT_SETTINGS = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=900, max_observation_tokens=32)


def settings_for_tests(nc: NATS, **overrides: object) -> SandboxdSettings:
    """Settings for a test daemon: few sandboxes (capacity is cheap to hit), a fast reaper, no warm
    pool (tests count containers; pool tests ask for one), and a reaper scope of this test's own
    nats-server, so parallel test runs never reap each other."""
    port = nc.connected_url.port if nc.connected_url else 0
    fields: dict[str, object] = {
        "max_sandboxes": 3,
        "reaper_interval_s": 0.5,
        "ping_timeout_s": 0.5,
        "scope": f"test-{port}",
        "warm_pool": 0,
    }
    return SandboxdSettings(**(fields | overrides))  # type: ignore[arg-type]


class _Started(TaskStatus[str]):
    """Stands in for anyio's TaskStatus when the daemon runs as a bare asyncio task."""

    def __init__(self) -> None:
        self.future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def started(self, value: str | None = None) -> None:
        self.future.set_result(value or "")


@contextlib.asynccontextmanager
async def running_sandboxd(nc: NATS, settings: SandboxdSettings) -> AsyncIterator[str]:
    """Run ``daemon.run`` in a background task until the block exits; yields the owner name."""
    status = _Started()
    task = asyncio.create_task(daemon.run(settings, nc, task_status=status))
    pending: set[asyncio.Future[object]] = {task, status.future}  # type: ignore[arg-type]
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why the daemon did not start
        raise RuntimeError("sandboxd returned before it started")
    try:
        yield status.future.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def containers_of(owner: str) -> list[dict[str, object]]:
    """Every container (running or not) labelled with sandboxd ``owner``, as Docker describes it."""
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(
            all=True, filters=msgspec.json.encode({"label": [f"{LABEL_OWNER}={owner}"]}).decode()
        )
        return [c._container for c in found]


def remove_container(traj_label: str, how: str = "kill") -> None:
    """``docker kill`` (or ``docker rm -f``) the one container labelled with the episode's id."""
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=rollstream.traj={traj_label}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(ids) == 1, ids
    argv = ["docker", "kill"] if how == "kill" else ["docker", "rm", "-f"]
    subprocess.run([*argv, ids[0]], capture_output=True, check=True)


async def run_concurrently(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int = 3) -> list[T]:
    """Await the jobs, at most ``limit`` at a time (the test sandboxd holds 3 sandboxes); results
    in the jobs' order."""
    limiter = anyio.CapacityLimiter(limit)
    results: dict[int, T] = {}

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await jobs[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    return [results[i] for i in range(len(jobs))]


async def passes(sandbox: SandboxClient, sandbox_id: str, commands: Sequence[str]) -> bool:
    """Whether every command exits 0 in the sandbox (run one after another, as a verifier does)."""
    return all([(await sandbox.exec(sandbox_id, c)).exit_code == 0 for c in commands])


async def verified_episode(
    sample: TaskSample,
    *,
    engine: InferenceEngine,
    sandbox: SandboxClient,
    settings: HarnessSettings,
    **options: Any,
) -> tuple[Trajectory, bool]:
    """Run one episode in a real sandbox, run the task's verify commands in the sandbox the episode
    left open (the loop never closes it: the reward worker verifies there), then close it."""
    traj = await run_episode(sample, engine=engine, sandbox=sandbox, settings=settings, **options)
    if not traj.sandbox_id:
        return traj, False
    try:
        return traj, await passes(sandbox, traj.sandbox_id, sample.task.verify)
    finally:
        with anyio.move_on_after(30, shield=True):
            await sandbox.close(traj.sandbox_id)


async def expert_trajectory(tok: object, sandbox: SandboxClient) -> ScoredTrajectory:
    """A level-3 task (two files to follow) solved by the scripted expert in a real sandbox."""
    task = builtin_tasks(seed=3, count=3, levels=(3,))[0]
    traj = await run_episode(
        TaskSample(run="src", task=task),
        engine=FilesExpert(tokenizer=tok, error_rate=0.0, seed=1),
        sandbox=sandbox,
        settings=EXPERT_SETTINGS,
        source="expert",
    )
    await sandbox.close(traj.sandbox_id)
    assert traj.status == "completed" and len(traj.chunks) == 4, traj.abort_reason
    return ScoredTrajectory(traj=msgspec.structs.replace(traj, task=task), reward=1.0)
