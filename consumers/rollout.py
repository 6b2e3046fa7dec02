"""The rollout group: tasks in, raw trajectories out, every chunk stamped with its policy version.

Each process runs ``rollout.concurrency`` episodes at once against one inference engine, behind a
``Batcher`` so that the turns of concurrent episodes are generated together in one batch. Before
every turn it swaps in newer weights if the learner announced some, so no episode starts (or goes
on) with weights older than ``latest - eta``; a trajectory may span versions. The tools of a task's
episode come from ``tools_for`` (its family's hook, passed in by whoever assembles the pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.agent_runner import CommandAgentRunner
from agent_harness.batcher import Batcher
from agent_harness.engine import InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.tools import ToolsFor, default_tools
from consumers.metrics import EPISODES
from consumers.settings import RolloutSettings
from sandboxd.client import SandboxClient
from schemas.codec import tasks_decoder
from schemas.task import TaskSample
from schemas.trajectory import Trajectory
from streams import policy
from streams.bus import Consumer, Delivery, Publisher, serve
from streams.metrics import IN_FLIGHT, MESSAGES, POLICY_VERSION, track_dead_letters
from streams.topology import ROLLOUT, subject

log = structlog.get_logger(__name__)


def make_engine(settings: RolloutSettings, policy_dir: Path) -> InferenceEngine:
    """The engine ``settings.engine`` names, for the policy at ``policy_dir``: local torch (CPU/GPU)
    or an sglang server."""
    if settings.engine == "sglang":
        from agent_harness.sglang_engine import SGLangEngine

        return SGLangEngine(settings.sglang_url, policy_dir)
    from agent_harness.torch_engine import TorchEngine

    return TorchEngine(policy_dir)


class WeightSync:
    """Keeps the engine on the learner's latest announced version."""

    def __init__(self, js: JetStreamContext, run: str, engine: InferenceEngine) -> None:
        self.js, self.run, self.engine = js, run, engine
        self._lock = anyio.Lock()
        self.loads = 0

    async def refresh(self) -> None:
        latest = await policy.latest(self.js, self.run)
        if latest is None or latest.version <= self.engine.version:
            return
        async with self._lock:
            if latest.version <= self.engine.version:
                return
            data = await policy.fetch_weights(self.js, latest)
            await self.engine.load_weights(data, latest.version)
            self.loads += 1
            log.info("weights_loaded", policy_version=latest.version)


async def _heartbeat(delivery: Delivery[Any], every_s: float) -> None:
    while True:
        await anyio.sleep(every_s)
        await delivery.in_progress()


async def run(
    settings: RolloutSettings,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    policy_dir: Path,
    engine: InferenceEngine | None = None,
    tools_for: ToolsFor = default_tools,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run episodes of run ``run`` from the shared ``rollout`` consumer until cancelled, each with
    the tools ``tools_for`` gives its task. ``engine`` replaces the one ``make_engine`` makes for
    the policy at ``policy_dir``."""
    if engine is None:
        engine = await anyio.to_thread.run_sync(make_engine, settings, policy_dir)
    batcher = Batcher(
        engine,
        max_batch=settings.concurrency,
        max_wait_s=settings.harness.batch_max_wait_ms / 1000,
    )
    consumer = await Consumer(js, ROLLOUT, run, tasks_decoder).bind()
    pub = Publisher(js)
    sync = WeightSync(js, run, batcher)
    sandbox = SandboxClient(nc)
    counts = {"episodes": 0}
    runner = None
    if settings.agent == "command":
        runner = CommandAgentRunner(settings.agent_command, settings.harness, batcher, pub, run)
        runner.proxy.before_call = sync.refresh

    in_flight = IN_FLIGHT.labels(worker="rollout", run=run)

    async def handle(delivery: Delivery[TaskSample]) -> None:
        sample = delivery.record
        in_flight.inc()
        try:
            await episode(delivery, sample)
        finally:
            in_flight.dec()

    async def episode(delivery: Delivery[TaskSample], sample: TaskSample) -> None:
        with structlog.contextvars.bound_contextvars(traj_id=sample.msg_id):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_heartbeat, delivery, settings.heartbeat_s)
                await sync.refresh()
                traj: Trajectory = await (
                    runner.episode(sample, sandbox)
                    if runner is not None
                    else run_episode(
                        sample,
                        engine=batcher,
                        sandbox=sandbox,
                        settings=settings.harness,
                        before_turn=sync.refresh,
                        registry=tools_for(sample.task),
                    )
                )
                traj = msgspec.structs.replace(traj, task=sample.task)
                await pub.publish(subject("raw", run), traj, msg_id=f"raw:{traj.traj_id}")
                tg.cancel_scope.cancel()
            await delivery.ack()
        EPISODES.labels(run=run, status=traj.status).inc()
        MESSAGES.labels(worker="rollout", run=run).inc()
        POLICY_VERSION.labels(worker="rollout", run=run).set(batcher.version)
        counts["episodes"] += 1
        if counts["episodes"] % 20 == 0:
            log.info(
                "rollout_progress",
                episodes=counts["episodes"],
                policy_version=batcher.version,
                weight_loads=sync.loads,
                mean_batch=round(batcher.stats.mean_batch, 2),
            )

    task_status.started()
    log.info("rollout_started", concurrency=settings.concurrency, policy_version=batcher.version)
    async with anyio.create_task_group() as tg:
        if runner is not None:
            await tg.start(runner.serve)
        tg.start_soon(track_dead_letters, consumer, "rollout", run)
        await serve(consumer, settings.concurrency, handle)
