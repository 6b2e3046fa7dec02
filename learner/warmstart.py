"""Replay warm start: supervised fine-tuning on the lake's successful expert trajectories, offline,
installed as the learner's first checkpoint so that online RL starts from it.

One pass of SFT replay through the learner (``replay_mode="sft"``) is far too little for the tiny
policy: learning to copy a word from the instruction or a tool response into a command takes it a
few hundred optimiser steps over a few hundred demonstrations (from ~120 it memorises which word
goes with which task and stays near 60 %; from ~350, 600 steps reach ~95 % on held-out tasks).
So the warm start runs those steps here, in
one blocking call, before the learner worker starts; the checkpoint it writes is at version 1 so
that rollout workers (which start from the base weights at version 0) load it before their first
episode.

``prepare_warm_start`` is what the learner process runs first (``just up``): seed the lake with
scripted-expert episodes it lacks, wait until the lake holds them, then ``warm_start`` in a worker
thread (the event loop keeps answering the broker and signals). Every step is idempotent, so a
learner killed anywhere in it and restarted ends with one warm-start checkpoint: the seeder skips
the episodes the lake already holds (and republishes none; their ids are deterministic anyway),
and the checkpoint is written atomically, once, at ``step-00000000``.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
import structlog
import torch
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.model import PolicySettings
from learner.checkpoint import CheckpointState, checkpoint_path, latest_checkpoint, write_checkpoint
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from schemas.trajectory import ScoredTrajectory

if TYPE_CHECKING:
    from producers.seed import Seeding

EXPERT_SQL = (
    "SELECT traj_id FROM trajectories WHERE source = 'expert' AND valid AND reward > 0 "
    "{run_filter}ORDER BY traj_id"
)
WARM_VERSION = 1
LAKE_WAIT_S = 180.0
"""How long the warm start waits for the lake writer to store the seeded episodes."""
LOG_EVERY_S = 10.0
log = structlog.get_logger(__name__)
OnStep = Callable[[int, float], None]


def sft_steps(
    trainer: Trainer,
    samples: Sequence[ScoredTrajectory],
    *,
    steps: int,
    batch: int,
    seed: int = 0,
    final_lr_fraction: float = 1.0,
    on_step: OnStep | None = None,
) -> list[float]:
    """``steps`` SFT steps on shuffled mini-batches of ``samples`` (reshuffled every pass); the
    learning rate decays linearly to ``final_lr_fraction`` of its value. Returns the losses.
    ``on_step(step, loss)`` runs after every step (progress, cancellation)."""
    if not samples:
        raise ValueError("no demonstrations to warm-start from")
    rng = random.Random(seed)
    size = min(batch, len(samples))
    sched = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda i: 1.0 - (1.0 - final_lr_fraction) * min(i / max(steps, 1), 1.0)
    )
    losses: list[float] = []
    order: list[ScoredTrajectory] = []
    for _ in range(steps):
        if len(order) < size:
            order = rng.sample(list(samples), len(samples))
        chunk, order = order[:size], order[size:]
        losses.append(trainer.train_step(chunk, loss="sft").loss)
        sched.step()
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return losses


def install(trainer: Trainer, checkpoint_root: Path, *, lr: float, version: int = WARM_VERSION) -> Path:
    """Write the trainer's model as the learner's checkpoint (step 0, ``version``) with a fresh
    optimiser at the online ``lr``, so online RL inherits neither SFT moments nor the SFT rate."""
    fresh = torch.optim.AdamW(trainer.model.parameters(), lr=lr)
    state = CheckpointState(version=version, step=0, extra={"warm_start": True})
    target = checkpoint_path(checkpoint_root, 0)
    return write_checkpoint(target, trainer.model, fresh, state, tokenizer_source=trainer.source_dir)


def imitate(
    base: Path,
    samples: Sequence[ScoredTrajectory],
    checkpoint_root: Path,
    settings: LearnerSettings,
    *,
    steps: int,
    batch: int,
    lr: float,
    final_lr_fraction: float = 1.0,
    on_step: OnStep | None = None,
    policy_settings: PolicySettings | None = None,
) -> tuple[Path, list[float]]:
    """SFT from ``base`` on ``samples`` (``sft_steps`` at ``lr``), installed under ``checkpoint_root``
    as version 1 with a fresh optimiser at the online ``settings.lr``; the checkpoint and losses."""
    trainer = Trainer(base, msgspec.structs.replace(settings, lr=lr, loss="sft"), policy_settings)
    losses = sft_steps(
        trainer,
        samples,
        steps=steps,
        batch=batch,
        seed=settings.seed,
        final_lr_fraction=final_lr_fraction,
        on_step=on_step,
    )
    return install(trainer, checkpoint_root, lr=settings.lr), losses


def warm_start(
    settings: LearnerSettings,
    *,
    policy_dir: Path,
    lake_root: Path,
    checkpoint_root: Path,
    steps: int = 1000,
    batch: int = 16,
    lr: float = 3e-3,
    final_lr_fraction: float = 0.1,
    lake_run: str | None = None,
    on_step: OnStep | None = None,
    policy_settings: PolicySettings | None = None,
) -> Path | None:
    """Warm-start the policy at ``policy_dir`` from the expert successes in the lake at
    ``lake_root`` (of ``lake_run``, default any run), as the first checkpoint under ``checkpoint_root``.

    Does nothing (returns ``None``) when the run already has a checkpoint or the lake holds no
    successful expert trajectory; otherwise returns the checkpoint written. Blocking.
    """
    from consumers.lake import load_scored

    if latest_checkpoint(checkpoint_root) is not None:
        return None
    run_filter = "" if lake_run is None else f"AND run = '{lake_run}' "
    try:
        samples = load_scored(lake_root, EXPERT_SQL.format(run_filter=run_filter))
    except Exception:  # noqa: BLE001 - a lake with no trajectories yet has nothing to warm-start from
        return None
    if not samples:
        return None
    log.info(
        "warm_start_sft",
        demonstrations=len(samples),
        steps=steps,
        batch=batch,
        lr=lr,
        final_lr_fraction=final_lr_fraction,
    )
    path, _ = imitate(
        policy_dir,
        samples,
        checkpoint_root,
        settings,
        steps=steps,
        batch=batch,
        lr=lr,
        final_lr_fraction=final_lr_fraction,
        on_step=on_step,
        policy_settings=policy_settings,
    )
    return path


# --- the learner's start-up ---------------------------------------------------------------------


def expert_rows(lake_root: Path, run: str) -> dict[str, bool]:
    """The lake's expert trajectories of ``run``: traj_id -> success (valid and reward > 0)."""
    from consumers.lake import query
    from streams.topology import check_run

    sql = (
        "SELECT traj_id, coalesce(valid AND reward > 0, false) AS ok FROM trajectories "
        f"WHERE run = '{check_run(run)}' AND source = 'expert'"
    )
    table = query(lake_root, sql)
    return dict(zip(table.column("traj_id").to_pylist(), table.column("ok").to_pylist(), strict=True))


async def wait_for_lake(lake_root: Path, run: str, ids: set[str], timeout_s: float) -> bool:
    """Wait until the lake holds every trajectory of ``ids`` (of run ``run``); False (logged) after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_log = time.monotonic()
    while True:
        have = await anyio.to_thread.run_sync(expert_rows, lake_root, run)
        stored = len(ids & have.keys())
        if stored == len(ids):
            log.info("warm_start_lake_ready", stored=stored, successes=sum(have.values()))
            return True
        if time.monotonic() >= deadline:
            log.error(
                "warm_start_lake_timeout",
                stored=stored,
                expected=len(ids),
                waited_s=timeout_s,
                hint="is the lake worker running? The warm start goes on with what the lake holds.",
            )
            return False
        if time.monotonic() - last_log >= LOG_EVERY_S:
            log.info("warm_start_waiting_for_lake", stored=stored, expected=len(ids))
            last_log = time.monotonic()
        await anyio.sleep(1.0)


async def seed_missing(
    settings: LearnerSettings,
    seeding: Seeding,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    policy_dir: Path,
    lake_root: Path,
    lake_wait_s: float = LAKE_WAIT_S,
) -> int:
    """Run the expert episodes of ``settings.seed_episodes`` that the lake at ``lake_root`` lacks
    (``producers.seed``, as ``seeding`` says, with the tokenizer at ``policy_dir``) and wait until
    it stores them. Returns how many episodes ran (0 when the lake already holds them all)."""
    if settings.seed_episodes == 0:
        return 0
    if seeding.producer.source != "builtin":
        log.info(
            "seed_skipped",
            reason=f"the scripted expert solves built-in tasks only, not {seeding.producer.source}",
        )
        return 0
    from producers import seed

    have = await anyio.to_thread.run_sync(expert_rows, lake_root, run)
    wanted = await seed.expert_ids(seeding.producer, nc, settings.seed_episodes, run=run)
    missing = set(wanted) - have.keys()
    log.info(
        "seed_check",
        in_lake=len(have),
        successes_in_lake=sum(have.values()),
        wanted=settings.seed_episodes,
        missing=len(missing),
    )
    if not missing:
        return 0
    report = await seed.run(
        seeding,
        js,
        nc,
        run=run,
        policy_dir=policy_dir,
        episodes=settings.seed_episodes,
        error_rate=settings.seed_error_rate,
        skip=have.keys(),
    )
    await wait_for_lake(lake_root, run, missing, lake_wait_s)
    return report.episodes


def cancellable_progress(steps: int) -> OnStep:
    """An ``on_step`` for a worker thread: stop when the host task is cancelled, log every ~10 s."""
    last = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        nonlocal last
        anyio.from_thread.check_cancelled()
        if time.monotonic() - last >= LOG_EVERY_S or step == steps:
            log.info("warm_start_progress", step=step, steps=steps, loss=round(loss, 4))
            last = time.monotonic()

    return on_step


async def prepare_warm_start(
    settings: LearnerSettings,
    seeding: Seeding,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    policy_dir: Path,
    lake_root: Path,
    checkpoint_root: Path,
    lake_wait_s: float = LAKE_WAIT_S,
    policy_settings: PolicySettings | None = None,
) -> Path | None:
    """The learner's first act (before ``Trainer.resume``): when run ``run`` has no checkpoint under
    ``checkpoint_root`` and ``settings.warm_start_steps`` > 0, seed the lake at ``lake_root`` with
    expert episodes, then warm-start the policy at ``policy_dir`` from its successful ones. Returns
    the checkpoint written (version 1), or None when there was nothing to do."""
    if settings.warm_start_steps == 0:
        log.info("warm_start_skipped", reason="learner.warm_start_steps = 0")
        return None
    if await anyio.to_thread.run_sync(latest_checkpoint, checkpoint_root) is not None:
        log.info("warm_start_skipped", reason="the run has a checkpoint")
        return None
    started = time.monotonic()
    seeded = await seed_missing(
        settings,
        seeding,
        js,
        nc,
        run=run,
        policy_dir=policy_dir,
        lake_root=lake_root,
        lake_wait_s=lake_wait_s,
    )
    job = functools.partial(
        warm_start,
        settings,
        policy_dir=policy_dir,
        lake_root=lake_root,
        checkpoint_root=checkpoint_root,
        steps=settings.warm_start_steps,
        batch=settings.warm_start_batch,
        lr=settings.warm_start_lr,
        final_lr_fraction=settings.warm_start_final_lr,
        lake_run=run,
        on_step=cancellable_progress(settings.warm_start_steps),
        policy_settings=policy_settings,
    )
    path = await anyio.to_thread.run_sync(job)
    seconds = round(time.monotonic() - started, 1)
    if path is None:
        log.warning(
            "warm_start_skipped", reason="no successful expert trajectory in the lake", seconds=seconds
        )
    else:
        log.info(
            "warm_start_done",
            checkpoint=str(path),
            policy_version=WARM_VERSION,
            seeded=seeded,
            seconds=seconds,
        )
    return path
