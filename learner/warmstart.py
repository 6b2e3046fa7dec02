"""Replay warm start: supervised fine-tuning on the lake's successful expert trajectories, offline,
installed as the learner's first checkpoint so that online RL starts from it.

One pass of SFT replay through the learner (``replay_mode="sft"``) is far too little for the tiny
policy: learning to copy a word from the instruction or a tool response into a command takes it a
few hundred optimiser steps over ~100 demonstrations. So the warm start runs those steps here, in
one blocking call, before the learner worker starts; the checkpoint it writes is at version 1 so
that rollout workers (which start from the base weights at version 0) load it before their first
episode.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import torch

from learner.checkpoint import CheckpointState, checkpoint_path, latest_checkpoint, write_checkpoint
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from schemas.trajectory import ScoredTrajectory

EXPERT_SQL = (
    "SELECT traj_id FROM trajectories WHERE source = 'expert' AND valid AND reward > 0 "
    "{run_filter}ORDER BY traj_id"
)
WARM_VERSION = 1


def sft_steps(
    trainer: Trainer,
    samples: Sequence[ScoredTrajectory],
    *,
    steps: int,
    batch: int,
    seed: int = 0,
    final_lr_fraction: float = 1.0,
) -> list[float]:
    """``steps`` SFT steps on shuffled mini-batches of ``samples`` (reshuffled every pass); the
    learning rate decays linearly to ``final_lr_fraction`` of its value. Returns the losses."""
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
    return losses


def install(trainer: Trainer, checkpoint_root: Path, *, lr: float, version: int = WARM_VERSION) -> Path:
    """Write the trainer's model as the learner's checkpoint (step 0, ``version``) with a fresh
    optimiser at the online ``lr``, so online RL inherits neither SFT moments nor the SFT rate."""
    fresh = torch.optim.AdamW(trainer.model.parameters(), lr=lr)
    state = CheckpointState(version=version, step=0, extra={"warm_start": True})
    target = checkpoint_path(checkpoint_root, 0)
    return write_checkpoint(target, trainer.model, fresh, state, tokenizer_source=trainer.source_dir)


def warm_start(
    cfg: Any,
    *,
    steps: int = 600,
    batch: int = 16,
    lr: float = 3e-3,
    lake_run: str | None = None,
) -> Path | None:
    """Warm-start run ``cfg.run`` from the lake's expert successes (of ``lake_run``, default any run).

    Does nothing (returns ``None``) when the run already has a checkpoint or the lake holds no
    successful expert trajectory; otherwise returns the checkpoint written. Blocking.
    """
    from producers.lake_source import load_scored

    root = cfg.state / "checkpoints" / cfg.run
    if latest_checkpoint(root) is not None:
        return None
    run_filter = "" if lake_run is None else f"AND run = '{lake_run}' "
    try:
        samples = load_scored(cfg.lake_root, EXPERT_SQL.format(run_filter=run_filter))
    except Exception:  # noqa: BLE001 - a lake with no trajectories yet has nothing to warm-start from
        return None
    if not samples:
        return None
    settings: LearnerSettings = cfg.learner
    trainer = Trainer(cfg.policy_dir, msgspec.structs.replace(settings, lr=lr, loss="sft"))
    sft_steps(trainer, samples, steps=steps, batch=batch, seed=settings.seed)
    return install(trainer, root, lr=settings.lr)
