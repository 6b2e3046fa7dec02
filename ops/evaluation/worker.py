"""``rollstream eval --every N`` and the ``eval`` worker of ``just up`` (``[eval] every = N``):
evaluate every N-th policy version of the run on a held-out task set, as checkpoints appear.

Versions are found where the learner writes them, ``<state>/checkpoints/<run>`` (the base policy
is version 0), every ``poll_s`` seconds; a version already in the lake's ``evals`` for this run
and task set is not evaluated again, so a restarted evaluator goes on where it stopped. It runs on
its own sandboxd (``concurrency`` sandboxes), so it never takes sandboxes from training.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from consumers.lake import LakeError, query
from ops.config import Config
from ops.evaluation.evaluate import checkpoints_of, evaluate_one, load_task_set
from ops.evaluation.policy import Policy, versions
from ops.evaluation.sandboxes import private_sandboxes

log = structlog.get_logger(__name__)


def evaluated_versions(cfg: Config) -> set[int]:
    """Versions the lake already holds policy evaluations of, for this run and task set."""
    sql = (
        "SELECT DISTINCT policy_version AS v FROM evals WHERE agent = 'policy' "
        f"AND run = '{cfg.run}' AND task_set = '{cfg.eval.tasks.replace(chr(39), chr(39) * 2)}'"
    )
    try:
        return {int(v) for v in query(cfg.lake_root, sql).column("v").to_pylist()}
    except LakeError:
        return set()


def due(cfg: Config, done: set[int]) -> list[Policy]:
    """Checkpointed versions divisible by ``every`` not evaluated yet, oldest first (v0 = base)."""
    known = versions(checkpoints_of(cfg))
    if 0 not in known and cfg.policy_dir.is_dir():
        known[0] = cfg.policy_dir
    every = max(cfg.eval.every, 1)
    return [
        Policy(label=f"v{v}", directory=d, version=v)
        for v, d in sorted(known.items())
        if v % every == 0 and v not in done
    ]


async def watch(
    cfg: Config, *, rounds: int = 0, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Evaluate due versions until cancelled (or for ``rounds`` polls, for tests)."""
    s = cfg.eval
    if not s.tasks or s.every <= 0:
        raise ValueError("background evaluation needs [eval] tasks = PATH and every = N > 0")
    load = partial(load_task_set, Path(s.tasks), network=s.build_network)
    tasks, _ = await anyio.to_thread.run_sync(load)
    done = await anyio.to_thread.run_sync(evaluated_versions, cfg)
    task_status.started()
    log.info("eval_watch_started", tasks=len(tasks), every=s.every, done=sorted(done))
    polls = 0
    async with private_sandboxes(cfg.sandboxd, s.concurrency + 1) as sandbox:
        while rounds <= 0 or polls < rounds:
            for policy in due(cfg, done):
                await evaluate_one(
                    cfg, sandbox, tasks, task_set=s.tasks, agent="policy", policy=policy, k=s.k,
                    concurrency=s.concurrency, pass_threshold=s.pass_threshold,
                )  # fmt: skip
                done.add(policy.version)
            polls += 1
            if rounds <= 0 or polls < rounds:
                await anyio.sleep(s.poll_s)
