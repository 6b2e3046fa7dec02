"""Expert seeding: scripted-expert episodes in real sandboxes, scored, published for warm-start.

Each episode runs ``agent_harness.expert.ScriptedExpert`` through the same agent loop as the
policy (so its tokens look exactly like the policy's) on a built-in task, is verified by
``consumers.reward.score`` and lands on ``rs.traj.scored.<run>`` as
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
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.expert import ScriptedExpert
from agent_harness.loop import run_episode
from consumers.reward import score
from producers.tasks import builtin_task_at
from sandboxd.client import SandboxClient
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory
from streams import policy
from streams.bus import Publisher
from streams.topology import subject

log = structlog.get_logger(__name__)
EXPERT_SEED_OFFSET = 1_000_003
"""Expert tasks are drawn with ``producer.seed + EXPERT_SEED_OFFSET`` (not the online tasks)."""


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


def expert_sample(cfg: Any, index: int) -> TaskSample:
    """Expert episode ``index``: a built-in task of the configured levels, with an ``expert-`` id."""
    task = builtin_task_at(cfg.producer.seed + EXPERT_SEED_OFFSET, index, tuple(cfg.producer.levels))
    task = msgspec.structs.replace(task, task_id=f"expert-{task.task_id}")
    return TaskSample(run=cfg.run, task=task, sample_idx=0)


def expert_ids(cfg: Any, episodes: int) -> list[str]:
    """The trajectory ids of expert episodes ``0 .. episodes-1`` (deterministic, as published)."""
    return [expert_sample(cfg, i).msg_id for i in range(episodes)]


async def expert_episode(
    cfg: Any, sample: TaskSample, sandbox: SandboxClient, tokenizer: Any, *, error_rate: float, version: int
) -> ScoredTrajectory:
    """Run and score one expert episode; the result is marked for SFT replay."""
    seed = random.Random(f"expert:{sample.msg_id}").randrange(2**31)
    expert = ScriptedExpert(tokenizer=tokenizer, error_rate=error_rate, seed=seed, version=version)
    traj = await run_episode(
        sample, engine=expert, sandbox=sandbox, settings=cfg.rollout.harness, source="expert"
    )
    traj = msgspec.structs.replace(traj, task=sample.task)
    scored = await score(traj, sandbox, cfg.reward.verify_timeout_s)
    return msgspec.structs.replace(scored, replay=True, replay_mode="sft")


def load_tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.policy_dir)


async def run(
    cfg: Any,
    js: JetStreamContext,
    nc: NATS,
    *,
    episodes: int,
    error_rate: float = 0.25,
    concurrency: int | None = None,
    skip: Collection[str] = (),
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> SeedReport:
    """Publish expert episodes ``0 .. episodes-1`` as scored trajectories to ``rs.traj.scored.<run>``,
    except those whose trajectory id is in ``skip`` (already in the lake), then return."""
    todo = [i for i, traj_id in enumerate(expert_ids(cfg, episodes)) if traj_id not in skip]
    tokenizer = await anyio.to_thread.run_sync(load_tokenizer, cfg)
    announced = await policy.latest(js, cfg.run)
    version = announced.version if announced is not None else 0
    sandbox = SandboxClient(nc)
    pub = Publisher(js)
    limit = anyio.Semaphore(concurrency or cfg.rollout.concurrency)
    counts = {"ok": 0, "invalid": 0, "done": 0}
    every = max(1, len(todo) // 10)
    task_status.started()
    log.info(
        "seed_started",
        episodes=len(todo),
        skipped=episodes - len(todo),
        error_rate=error_rate,
        policy_version=version,
    )

    async def one(index: int) -> None:
        async with limit:
            sample = expert_sample(cfg, index)
            scored = await expert_episode(
                cfg, sample, sandbox, tokenizer, error_rate=error_rate, version=version
            )
            await pub.publish(subject("scored", cfg.run), scored, msg_id=f"scored:{scored.traj.traj_id}")
            counts["ok"] += scored.valid and scored.reward > 0
            counts["invalid"] += not scored.valid
            counts["done"] += 1
            if counts["done"] % every == 0 and counts["done"] < len(todo):
                log.info("seed_progress", done=counts["done"], episodes=len(todo), successes=counts["ok"])

    async with anyio.create_task_group() as tg:
        for i in todo:
            tg.start_soon(one, i)
    report = SeedReport(episodes=len(todo), successes=counts["ok"], invalid=counts["invalid"])
    log.info("seed_done", episodes=report.episodes, successes=report.successes, invalid=report.invalid)
    return report
