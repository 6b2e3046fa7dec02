"""Evaluations: load a task set (images built), resolve policies, run the attempts on the
evaluator's own sandboxd, write them to the lake, summarise them."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from agent_harness.batcher import Batcher
from consumers.lake import EvalRecord, LakeWriter
from ops.config import Config
from ops.evaluation.policy import Policy, resolve
from ops.evaluation.runner import Agent, Plan, run_plan
from ops.evaluation.sandboxes import private_sandboxes
from ops.evaluation.summary import Summary, summarize
from producers.families import import_tasks, tools_for
from producers.families.imported import Imported, importable, prepare
from sandboxd.client import SandboxClient
from schemas.task import Task

log = structlog.get_logger(__name__)
Progress = Callable[[str], None]


class EvalError(ValueError):
    """An evaluation that cannot start (no importable task, an unknown policy)."""


@dataclass(frozen=True)
class Outcome:
    """One evaluation's records and their summary."""

    summary: Summary
    records: list[EvalRecord]


def load_task_set(
    path: Path, *, network: str = "none", progress: Progress | None = None
) -> tuple[list[Task], list[Imported]]:
    """The importable tasks of ``path`` with their images built, and every item as imported."""
    items = prepare(import_tasks(path), network=network, progress=progress)
    tasks = importable(items)
    if not tasks:
        raise EvalError(f"{path} holds no importable task: run `rollstream tasks import {path}` to see why")
    return tasks, items


def checkpoints_of(cfg: Config) -> Path:
    return cfg.state / "checkpoints" / cfg.run


def resolve_policy(cfg: Config, spec: str) -> Policy:
    return resolve(spec, checkpoints=checkpoints_of(cfg), base=cfg.policy_dir)


def new_eval_id(cfg: Config, label: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[-40:]
    return f"{cfg.run}-{safe}-{int(time.time())}-{secrets.token_hex(2)}"


def _engine(policy: Policy, cfg: Config, concurrency: int) -> Batcher:
    from agent_harness.torch_engine import TorchEngine

    inner = TorchEngine.for_policy(
        policy.directory, cfg.policy, version=policy.version, num_threads=cfg.torch_threads or None
    )
    harness = cfg.rollout.harness
    return Batcher(inner, max_batch=concurrency, max_wait_s=harness.batch_max_wait_ms / 1000)


async def evaluate_one(
    cfg: Config,
    sandbox: SandboxClient,
    tasks: list[Task],
    *,
    task_set: str,
    agent: Agent,
    policy: Policy | None,
    k: int,
    concurrency: int,
    pass_threshold: float = 1.0,
) -> Outcome:
    """K attempts per task by ``agent`` (with ``policy`` for ``policy``); records written to the lake."""
    label = "oracle" if agent == "oracle" or policy is None else policy.label
    plan = Plan(
        eval_id=new_eval_id(cfg, label),
        run=cfg.run,
        task_set=task_set,
        agent=agent,
        policy=label,
        version=-1 if agent == "oracle" or policy is None else policy.version,
        k=k,
        concurrency=concurrency,
        pass_threshold=pass_threshold,
        verify_timeout_s=cfg.reward.verify_timeout_s,
        tool_format=cfg.policy.tool_format,
    )
    engine = None
    if agent == "policy":
        assert policy is not None
        engine = await anyio.to_thread.run_sync(_engine, policy, cfg, concurrency)
    started = time.monotonic()
    records = await run_plan(
        plan, tasks, sandbox=sandbox, engine=engine, harness=cfg.rollout.harness, tools_for=tools_for
    )
    wall = time.monotonic() - started
    await anyio.to_thread.run_sync(write_records, cfg.lake_root, records)
    summary = summarize(records, k, wall)
    log.info(
        "eval_done",
        eval_id=plan.eval_id,
        policy=label,
        pass1=round(summary.pass1.value, 4),
        wall_s=round(wall, 1),
    )
    return Outcome(summary=summary, records=records)


def write_records(lake: Path, records: list[EvalRecord]) -> None:
    writer = LakeWriter(lake, writer_id=f"eval-{os.getpid()}-{secrets.token_hex(2)}")
    for r in records:
        writer.add_eval(r)
    writer.flush()


async def evaluate(
    cfg: Config,
    tasks: list[Task],
    *,
    task_set: str,
    agent: Agent,
    policies: list[Policy],
    k: int,
    concurrency: int,
    pass_threshold: float = 1.0,
) -> list[Outcome]:
    """Evaluate each policy in turn (or the oracle once) on its own sandboxd."""
    out = []
    async with private_sandboxes(cfg.sandboxd, concurrency + 1) as sandbox:
        for policy in policies if agent == "policy" else [None]:
            out.append(
                await evaluate_one(
                    cfg,
                    sandbox,
                    tasks,
                    task_set=task_set,
                    agent=agent,
                    policy=policy,
                    k=k,
                    concurrency=concurrency,
                    pass_threshold=pass_threshold,
                )
            )
    return out


__all__ = ["EvalError", "Outcome", "evaluate", "evaluate_one", "load_task_set", "resolve_policy"]
