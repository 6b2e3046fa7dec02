"""Episodes outside the streams: tasks played in real sandboxes by any engine, then scored.

The expert seeder (``producers.seed``) and the demonstrations' evaluations use it: the same agent
loop, tools and verifier as the rollout and reward groups, with no broker in between.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

from agent_harness.engine import InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from agent_harness.tools import ToolsFor
from consumers.probe import ProbeSettings
from consumers.reward import judge
from sandboxd.client import SandboxClient
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory, TrajSource

EngineFor = Callable[[TaskSample], InferenceEngine]
"""The engine that plays a sample: one shared (a policy behind a ``Batcher``) or one per episode."""


async def play(
    samples: Sequence[TaskSample],
    engine_for: EngineFor,
    sandbox: SandboxClient,
    harness: HarnessSettings,
    *,
    tools_for: ToolsFor,
    verify_timeout_s: float,
    concurrency: int,
    source: TrajSource = "online",
    on_scored: Callable[[ScoredTrajectory], Awaitable[None]] | None = None,
    probe: ProbeSettings | None = None,
) -> list[ScoredTrajectory]:
    """Play and score every sample, ``concurrency`` at a time; ``on_scored`` runs on each result as
    it comes. Returns the results in the order of ``samples``. The samples' tasks were made by the
    caller, so they are the authoritative copies (no registry); the security screen runs as in the
    reward group (the sandbox probe only with ``probe``)."""
    results: dict[int, ScoredTrajectory] = {}
    limit = anyio.Semaphore(concurrency)

    async def one(i: int, sample: TaskSample) -> None:
        async with limit:
            traj = await run_episode(
                sample,
                engine=engine_for(sample),
                sandbox=sandbox,
                settings=harness,
                source=source,
                registry=tools_for(sample.task),
            )
            results[i] = await judge(
                traj, sample.task, sandbox, verify_timeout_s, tools_for=tools_for, probe_settings=probe
            )
            if on_scored is not None:
                await on_scored(results[i])

    async with anyio.create_task_group() as tg:
        for i, sample in enumerate(samples):
            tg.start_soon(one, i, sample)
    return [results[i] for i in range(len(samples))]
