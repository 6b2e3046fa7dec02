"""The rollout group: tasks in, raw trajectories out, every chunk stamped with its policy version.

Each process runs ``rollout.concurrency`` episodes at once against one inference engine, behind a
``Batcher`` so that the turns of concurrent episodes are generated together in one batch. Before
every turn it swaps in newer weights if the learner announced some, so no episode starts (or goes
on) with weights older than ``latest - eta``; a trajectory may span versions. The tools of a task's
episode come from ``tools_for`` (its family's hook, passed in by whoever assembles the pipeline).
"""

from __future__ import annotations

from pathlib import Path

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
from agent_harness.model import PolicySettings
from agent_harness.tools import ToolsFor, default_tools
from consumers.durable import EpisodeJournal, Leases, lease_for, load_resume
from consumers.metrics import EPISODES
from consumers.settings import RolloutSettings
from sandboxd.client import SandboxClient
from schemas.codec import tasks_decoder
from schemas.task import TaskSample
from schemas.trajectory import Trajectory
from streams import policy
from streams.bus import Consumer, Delivery, Publisher, heartbeat, serve
from streams.metrics import IN_FLIGHT, MESSAGES, POLICY_VERSION, track_dead_letters
from streams.topology import ROLLOUT, subject

log = structlog.get_logger(__name__)


def make_engine(
    settings: RolloutSettings, policy_dir: Path, policy_settings: PolicySettings | None = None
) -> InferenceEngine:
    """The engine ``settings.engine`` names, for the policy at ``policy_dir``: local torch (on
    ``[policy]``'s device, in its dtype), an sglang server, or OpenAI-compatible completions
    servers (weights through ``settings.weights_dir``)."""
    weights_dir = Path(settings.weights_dir) if settings.weights_dir else None
    if settings.engine == "sglang":
        from agent_harness.sglang_engine import SGLangEngine

        return SGLangEngine(settings.sglang_url, policy_dir, weights_dir=weights_dir)
    if settings.engine == "openai":
        from agent_harness.openai_engine import OpenAIEngine

        return OpenAIEngine(
            settings.openai_urls,
            policy_dir,
            model=settings.openai_model,
            weights_dir=weights_dir,
            reload_path=settings.reload_path,
        )
    from agent_harness.lora import AdapterEngine
    from agent_harness.torch_engine import TorchEngine

    # takes LoRA adapters as well
    return AdapterEngine(TorchEngine.for_policy(policy_dir, policy_settings or PolicySettings()), policy_dir)


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
        async with self._lock:  # one fetch at a time, always of the newest version (one pass)
            found = await policy.fetch_newest(self.js, self.run, newer_than=self.engine.version)
            if found is None:
                return
            record, data = found
            await self.engine.load_weights(data, record.version)
            self.loads += 1
            log.info("weights_loaded", policy_version=record.version)


async def run(
    settings: RolloutSettings,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    policy_dir: Path,
    engine: InferenceEngine | None = None,
    tools_for: ToolsFor = default_tools,
    policy_settings: PolicySettings | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run episodes of run ``run`` from the shared ``rollout`` consumer until cancelled, each with
    the tools ``tools_for`` gives its task. ``engine`` replaces the one ``make_engine`` makes for
    the policy at ``policy_dir`` (loaded as ``policy_settings`` says, which also names its tool
    format)."""
    policy_settings = policy_settings or PolicySettings()
    if engine is None:
        engine = await anyio.to_thread.run_sync(make_engine, settings, policy_dir, policy_settings)
    batcher = Batcher(
        engine,
        max_batch=settings.concurrency,
        max_wait_s=settings.harness.batch_max_wait_ms / 1000,
    )
    consumer = await Consumer(js, ROLLOUT, run, tasks_decoder).bind()
    pub = Publisher(js)
    sync = WeightSync(js, run, batcher)
    sandbox = SandboxClient(nc)
    leases = Leases(sandbox, lease_s=lease_for(settings.heartbeat_s), every_s=settings.heartbeat_s)
    stats = RolloutStats()
    runner = None
    if settings.agent == "command":
        runner = CommandAgentRunner(settings.agent_command, settings.harness, batcher, pub, run)
        runner.proxy.before_call = sync.refresh

    in_flight = IN_FLIGHT.labels(worker="rollout", run=run)

    async def handle(delivery: Delivery[TaskSample]) -> None:
        in_flight.inc()
        try:
            traj = await episode(delivery, delivery.record)
        finally:
            in_flight.dec()
        stats.count(traj, run, batcher, sync)

    async def episode(delivery: Delivery[TaskSample], sample: TaskSample) -> Trajectory:
        with structlog.contextvars.bound_contextvars(traj_id=sample.msg_id):
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat, delivery, settings.heartbeat_s)
                resume = None
                if delivery.deliveries > 1:  # an earlier delivery may have left durable chunks
                    resume = await load_resume(js, sandbox, leases, sample)
                journal = EpisodeJournal(
                    js,
                    pub,
                    leases,
                    sample,
                    attempt=delivery.deliveries,
                    resumed=resume.resumed if resume else 0,
                )
                if resume is not None:
                    journal.sandbox_id, journal.sandbox_owner = resume.sandbox_id, resume.sandbox_owner
                    journal.started_at = resume.started_at or journal.started_at
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
                        tool_format=policy_settings.tool_format,
                        journal=journal,
                        resume=resume,
                    )
                )
                traj = msgspec.structs.replace(traj, task=sample.task)
                await leases.hand_over(traj.sandbox_id, settings.harness.sandbox_ttl_s)
                await pub.publish(subject("raw", run), traj, msg_id=f"raw:{traj.traj_id}")
                tg.cancel_scope.cancel()
            await delivery.ack()
            await journal.forget()
        return traj

    task_status.started()
    log.info("rollout_started", concurrency=settings.concurrency, policy_version=batcher.version)
    async with anyio.create_task_group() as tg:
        if runner is not None:
            await tg.start(runner.serve)
        tg.start_soon(track_dead_letters, consumer, "rollout", run)
        tg.start_soon(leases.run)
        await serve(consumer, settings.concurrency, handle)


class RolloutStats:
    """Episodes this worker finished (and resumed), with a progress line every 20."""

    def __init__(self) -> None:
        self.episodes = 0
        self.resumed = 0

    def count(self, traj: Trajectory, run: str, batcher: Batcher, sync: WeightSync) -> None:
        EPISODES.labels(run=run, status=traj.status).inc()
        MESSAGES.labels(worker="rollout", run=run).inc()
        POLICY_VERSION.labels(worker="rollout", run=run).set(batcher.version)
        self.episodes += 1
        self.resumed += traj.resumed > 0
        if self.episodes % 20 == 0:
            log.info(
                "rollout_progress",
                episodes=self.episodes,
                resumed=self.resumed,
                policy_version=batcher.version,
                weight_loads=sync.loads,
                mean_batch=round(batcher.stats.mean_batch, 2),
            )
