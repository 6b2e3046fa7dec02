"""Expert seeding: scripted-expert episodes in real sandboxes, scored, published for warm-start.

Each episode runs the task family's scripted expert (``Family.expert``) through the same agent loop
as the policy (so its tokens look exactly like the policy's) on one of the family's tasks, is
verified by ``consumers.reward.score`` and lands on ``rs.traj.scored.<run>`` as
``ScoredTrajectory(replay=True, replay_mode="sft")`` with ``traj.source = "expert"``: the lake keeps
it and the learner imitates the successful ones (SFT), outside the staleness gate.

Expert tasks have their own ids (``expert-`` prefix, their own task seed), so they never collide
with the online producer's trajectory ids; seeding twice with the same settings publishes the same
ids, which the broker (within its duplicate window) and the lake de-duplicate; ``skip`` leaves out
the episodes the lake already holds, so a seeding interrupted and restarted resumes where it was.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.engine import InferenceEngine
from consumers.settings import RewardSettings, RolloutSettings
from producers import families
from producers.families.base import Family, TaskSandbox
from producers.play import EngineFor, play
from producers.settings import ProducerSettings
from sandboxd.client import SandboxClient
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory
from streams import policy
from streams.bus import Publisher
from streams.topology import subject

log = structlog.get_logger(__name__)
EXPERT_SEED_OFFSET = 1_000_003
"""Expert tasks are drawn with ``producer.seed + EXPERT_SEED_OFFSET`` (not the online tasks)."""


class Seeding(msgspec.Struct, frozen=True, kw_only=True):
    """The sections of a run that seeding reads: ``producer`` (the task family and its seed),
    ``rollout`` (the agent loop's budgets, episodes at once) and ``reward`` (the verify limit)."""

    producer: ProducerSettings
    rollout: RolloutSettings
    reward: RewardSettings


@dataclass(frozen=True, slots=True)
class SeedReport:
    """What a seeding run published."""

    episodes: int
    successes: int
    invalid: int

    @property
    def success_rate(self) -> float:
        valid = self.episodes - self.invalid
        return self.successes / valid if valid else 0.0


def family_of(settings: ProducerSettings) -> Family:
    """The family ``producer.source`` names; a source with no scripted expert (jsonl) raises."""
    family = families.for_source(settings.source)
    if family is None:
        raise ValueError(f"producer.source = {settings.source!r} has no scripted expert to seed with")
    return family


async def expert_samples(
    settings: ProducerSettings, sandbox: TaskSandbox, episodes: int, family: Family, *, run: str
) -> list[TaskSample]:
    """Expert episodes ``0 .. episodes-1`` of run ``run``: the family's tasks under the expert
    seed, with ``expert-`` ids (deterministic, as published), at ``settings.expert_levels``
    when set (else ``settings.levels``)."""
    params = msgspec.structs.replace(settings, levels=settings.expert_levels or settings.levels)
    tasks = await family.make_tasks(
        sandbox, params, seed=settings.seed + EXPERT_SEED_OFFSET, start=0, count=episodes
    )
    return [
        TaskSample(run=run, task=msgspec.structs.replace(t, task_id=f"expert-{t.task_id}"), sample_idx=0)
        for t in tasks
    ]


async def expert_ids(
    settings: ProducerSettings, nc: NATS, episodes: int, *, run: str, family: Family | None = None
) -> list[str]:
    """The trajectory ids of run ``run``'s expert episodes ``0 .. episodes-1`` (deterministic, as
    published)."""
    family = family or family_of(settings)
    samples = await expert_samples(settings, SandboxClient(nc), episodes, family, run=run)
    return [s.msg_id for s in samples]


def experts(
    family: Family, tokenizer: Any, *, error_rate: float, version: int, shortcut: float = 0.0
) -> EngineFor:
    """One expert per episode, its randomness drawn from the episode's id (reproducible)."""

    def engine_for(sample: TaskSample) -> InferenceEngine:
        seed = random.Random(f"expert:{sample.msg_id}").randrange(2**31)
        return family.expert(
            tokenizer=tokenizer, error_rate=error_rate, seed=seed, version=version, shortcut=shortcut
        )

    return engine_for


def load_tokenizer(policy_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


@dataclass
class _Tally:
    todo: int
    done: int = 0
    successes: int = 0
    invalid: int = 0

    def add(self, scored: ScoredTrajectory) -> None:
        self.done += 1
        self.successes += scored.valid and scored.reward > 0
        self.invalid += not scored.valid
        if self.done % max(1, self.todo // 10) == 0 and self.done < self.todo:
            log.info("seed_progress", done=self.done, episodes=self.todo, successes=self.successes)


async def run(
    seeding: Seeding,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    policy_dir: Path,
    episodes: int,
    error_rate: float = 0.25,
    concurrency: int | None = None,
    skip: Collection[str] = (),
    family: Family | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> SeedReport:
    """Publish expert episodes ``0 .. episodes-1`` of ``family`` (default: the one
    ``producer.source`` names) as scored trajectories to ``rs.traj.scored.<run>``, except those whose
    trajectory id is in ``skip`` (already in the lake), then return. The expert writes with the
    tokenizer of the policy at ``policy_dir``."""
    family = family or family_of(seeding.producer)
    sandbox = SandboxClient(nc)
    samples = await expert_samples(seeding.producer, sandbox, episodes, family, run=run)
    todo = [s for s in samples if s.msg_id not in skip]
    tokenizer = await anyio.to_thread.run_sync(load_tokenizer, policy_dir)
    announced = await policy.latest(js, run)
    version = announced.version if announced is not None else 0
    pub = Publisher(js)
    tally = _Tally(len(todo))
    task_status.started()
    log.info(
        "seed_started",
        family=family.name,
        episodes=len(todo),
        skipped=episodes - len(todo),
        error_rate=error_rate,
        policy_version=version,
    )

    async def publish(scored: ScoredTrajectory) -> None:
        scored = msgspec.structs.replace(scored, replay=True, replay_mode="sft")
        await pub.publish(subject("scored", run), scored, msg_id=f"scored:{scored.traj.traj_id}")
        tally.add(scored)

    await play(
        todo,
        experts(
            family,
            tokenizer,
            error_rate=error_rate,
            version=version,
            shortcut=seeding.producer.expert_shortcut,
        ),
        sandbox,
        seeding.rollout.harness,
        tools_for=family.tools,
        verify_timeout_s=seeding.reward.verify_timeout_s,
        concurrency=concurrency or seeding.rollout.concurrency,
        source="expert",
        on_scored=publish,
        probe=seeding.reward.probe,
    )
    report = SeedReport(episodes=len(todo), successes=tally.successes, invalid=tally.invalid)
    log.info("seed_done", episodes=report.episodes, successes=report.successes, invalid=report.invalid)
    return report
