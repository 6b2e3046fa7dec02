"""The pipeline builder: every worker of a run, assembled in one place.

``ops.worker`` starts one of them per process (``just up``); the learning demonstrations
(``ops.demo``) start several in one process on a shared broker. This is where the whole ``Config``
is sliced: each worker receives its own section and the few run-level facts it needs (the run's
name, the policy, lake and checkpoint paths), never the whole configuration. Task families are
wired in here and nowhere else: the producer streams the family that ``producer.source`` names, the
rollout and reward workers take each task's tools from its family (``producers.families.tools_for``),
and the learner's warm start seeds with the family's scripted expert.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.engine import InferenceEngine
from ops.config import Config
from producers.seed import Seeding

WORKERS = ("sandboxd", "producer", "rollout", "reward", "learner", "lake", "proxy", "eval")
Starter = Callable[..., Coroutine[Any, Any, Any]]
"""``await task_group.start(starter)``: runs a worker, which calls ``task_status.started()`` once bound."""


def seeding(cfg: Config) -> Seeding:
    """The sections expert seeding reads (``producers.seed``)."""
    return Seeding(producer=cfg.producer, rollout=cfg.rollout, reward=cfg.reward)


def pipeline_budget(cfg: Config, *, with_learner: bool) -> int | None:
    """The producer's version-aware admission budget (``producers.tasks``): samples in the whole
    pipeline, (η + 1) x batch x publish_every; None (no such bound) without a learner to drain it."""
    if not (cfg.producer.admission and with_learner):
        return None
    learner = cfg.learner
    return (learner.max_staleness + 1) * learner.batch_size * learner.publish_every


def starter(
    name: str,
    cfg: Config,
    js: JetStreamContext,
    nc: NATS,
    *,
    engine: InferenceEngine | None = None,
    with_learner: bool | None = None,
) -> Starter:
    """Worker ``name`` of run ``cfg.run``; ``engine`` replaces the rollout worker's own (the
    demonstrations hand it the warm-started policy). ``with_learner``: whether a learner drains the
    run (default: ``processes.learner > 0``). Each worker's modules load only when it starts."""
    if name == "sandboxd":
        from sandboxd import daemon

        return lambda task_status: daemon.run(cfg.sandboxd, nc, task_status=task_status)
    if name == "producer":
        from producers import tasks

        learning = cfg.processes.learner > 0 if with_learner is None else with_learner
        budget = pipeline_budget(cfg, with_learner=learning)
        return lambda task_status: tasks.run(
            cfg.producer, js, nc, run=cfg.run, pipeline_budget=budget, task_status=task_status
        )
    if name == "rollout":
        from consumers import rollout
        from producers.families import tools_for

        return lambda task_status: rollout.run(
            cfg.rollout_settings,
            js,
            nc,
            run=cfg.run,
            policy_dir=cfg.policy_dir,
            engine=engine,
            tools_for=tools_for,
            policy_settings=cfg.policy,
            task_status=task_status,
        )
    if name == "reward":
        from consumers import reward
        from producers.families import tools_for

        return lambda task_status: reward.run(
            cfg.reward, js, nc, run=cfg.run, tools_for=tools_for, task_status=task_status
        )
    if name == "learner":
        return lambda task_status: _learner(cfg, js, nc, task_status=task_status)
    if name == "lake":
        from consumers import lake

        return lambda task_status: lake.run(
            cfg.lake, js, run=cfg.run, root=cfg.lake_root, task_status=task_status
        )
    if name == "proxy":
        from consumers import proxy_worker

        return lambda task_status: proxy_worker.run(
            cfg.proxy,
            cfg.rollout_settings,
            js,
            run=cfg.run,
            policy_dir=cfg.policy_dir,
            policy_settings=cfg.policy,
            task_status=task_status,
        )
    if name == "eval":  # on its own broker and sandboxd: it only reads checkpoints and writes the lake
        from ops.evaluation import worker as eval_worker

        return lambda task_status: eval_worker.watch(cfg, task_status=task_status)
    raise ValueError(f"unknown worker {name!r}; choose one of {', '.join(WORKERS)}")


async def start(
    tg: TaskGroup,
    names: Iterable[str],
    cfg: Config,
    js: JetStreamContext,
    nc: NATS,
    *,
    engine: InferenceEngine | None = None,
) -> None:
    """Start workers ``names`` in ``tg``, in that order, each once it is bound (the producer's
    admission counts on a learner only when ``names`` holds one)."""
    names = list(names)
    for name in names:
        await tg.start(starter(name, cfg, js, nc, engine=engine, with_learner="learner" in names))


async def _learner(cfg: Config, js: JetStreamContext, nc: NATS, *, task_status: TaskStatus[None]) -> None:
    """The learner role: the replay warm start when the run has no checkpoint, then training."""
    from learner import warmstart, worker

    await warmstart.prepare_warm_start(
        cfg.learner,
        seeding(cfg),
        js,
        nc,
        run=cfg.run,
        policy_dir=cfg.policy_dir,
        lake_root=cfg.lake_root,
        checkpoint_root=cfg.checkpoint_root,
        policy_settings=cfg.policy,
    )
    await worker.run(
        cfg.learner,
        js,
        run=cfg.run,
        policy_dir=cfg.policy_dir,
        checkpoint_root=cfg.checkpoint_root,
        group_size=cfg.producer.group_size,
        policy_settings=cfg.policy,
        task_status=task_status,
    )
