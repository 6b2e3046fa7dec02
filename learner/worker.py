"""The learner process: scored trajectories in, new policy versions out.

Per batch: admit each sample through the staleness gate (``s = N - min version <= eta``; replay
samples are governed by importance truncation instead), take one optimiser step on the admitted
ones, checkpoint when due, publish weights (object store, then KV), write a ``TrainRecord`` for
every sample and ack. Messages of steps not yet checkpointed stay unacked (heartbeated), so a
learner killed with SIGKILL gets them back; the checkpoint remembers the ids it trained, so none
is trained twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from learner.settings import LearnerSettings
from learner.staleness import admit
from learner.trainer import StepResult, Trainer
from schemas.codec import scored_decoder
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory
from streams import policy
from streams.bus import Consumer, Delivery, Publisher
from streams.topology import LEARNER, subject

log = structlog.get_logger(__name__)
RECENT_IDS_KEPT = 4096


class Learner:
    """State of one learner process around a ``Trainer``."""

    def __init__(
        self,
        trainer: Trainer,
        settings: LearnerSettings,
        js: JetStreamContext,
        run: str,
        checkpoint_root: Path,
    ) -> None:
        self.trainer, self.settings, self.js, self.run = trainer, settings, js, run
        self.checkpoint_root = checkpoint_root
        self.pub = Publisher(js)
        self.unacked: list[Delivery[ScoredTrajectory]] = []
        recent = trainer.resumed_extra.get("recent_trained", [])
        self.recent_trained: list[str] = list(recent) if isinstance(recent, list) else []
        self._recent_set = set(self.recent_trained)

    @property
    def version(self) -> int:
        return self.trainer.version

    async def sync_version(self) -> None:
        """Versions continue after a restart: N = max(checkpoint version, announced version)."""
        announced = await policy.latest(self.js, self.run)
        if announced is not None and announced.version > self.trainer.version:
            self.trainer.version = announced.version
        elif announced is None or announced.version < self.trainer.version:
            await self.publish_weights()
        log.info("learner_version", policy_version=self.trainer.version, step=self.trainer.step)

    async def publish_weights(self) -> None:
        data = await anyio.to_thread.run_sync(self.trainer.weights_bytes)
        await policy.publish_weights(self.js, self.run, self.trainer.version, data, step=self.trainer.step)
        old = self.trainer.version - self.settings.max_staleness - 3
        if old >= 0:
            await policy.delete_weights(self.js, self.run, old)

    def _record(
        self, s: ScoredTrajectory, fate: str, reason: str, staleness: int, step: int, loss: float = 0.0
    ) -> TrainRecord:
        return TrainRecord(
            run=self.run,
            traj_id=s.traj.traj_id,
            task_id=s.traj.task_id,
            fate=fate,  # type: ignore[arg-type]
            reason=reason,
            learner_version=self.version,
            min_version=s.traj.min_version,
            staleness=staleness,
            max_staleness=self.settings.max_staleness,
            step=step,
            reward=s.reward,
            source="replay" if s.replay else "online",
            loss=loss,
            time=time.time(),
        )

    def triage(
        self, batch: Sequence[Delivery[ScoredTrajectory]]
    ) -> tuple[list[Delivery[ScoredTrajectory]], list[TrainRecord]]:
        """Split a batch into trainable deliveries and drop records (with reasons)."""
        keep: list[Delivery[ScoredTrajectory]] = []
        drops: list[TrainRecord] = []
        for d in batch:
            s = d.record
            ok, stale = admit(self.version, s.traj, self.settings.max_staleness)
            if s.traj.traj_id in self._recent_set:
                drops.append(
                    self._record(s, "dropped", "duplicate: already trained", stale, self.trainer.step)
                )
            elif not s.valid:
                drops.append(
                    self._record(s, "dropped", f"invalid: {s.invalid_reason}"[:500], stale, self.trainer.step)
                )
            elif not s.traj.chunks:
                drops.append(self._record(s, "dropped", "empty: no chunks", stale, self.trainer.step))
            elif not ok and not s.replay:
                drops.append(
                    self._record(
                        s,
                        "dropped",
                        f"stale: s={stale} > eta={self.settings.max_staleness}",
                        stale,
                        self.trainer.step,
                    )
                )
            else:
                keep.append(d)
        return keep, drops

    async def step(
        self, keep: list[Delivery[ScoredTrajectory]]
    ) -> tuple[StepResult | None, list[TrainRecord]]:
        samples = [d.record for d in keep]
        sft = [s for s in samples if s.replay and s.replay_mode == "sft"]
        rest = [s for s in samples if not (s.replay and s.replay_mode == "sft")]
        result: StepResult | None = None
        records: list[TrainRecord] = []
        groups: list[tuple[list[ScoredTrajectory], str | None]] = [(sft, "sft"), (rest, None)]
        for group, loss in groups:
            if not group:
                continue
            step = functools.partial(self.trainer.train_step, group, loss=loss)
            done: StepResult = await anyio.to_thread.run_sync(step)
            result = done
            per = done.per_sample_loss or [done.loss] * len(group)
            for s, sample_loss in zip(group, per, strict=False):
                stale = self.version - s.traj.min_version
                records.append(self._record(s, "trained", "", stale, done.step, float(sample_loss)))
        for r in records:
            self._remember(r.traj_id)
        return result, records

    def _remember(self, traj_id: str) -> None:
        self.recent_trained.append(traj_id)
        self._recent_set.add(traj_id)
        if len(self.recent_trained) > RECENT_IDS_KEPT:
            gone = self.recent_trained.pop(0)
            self._recent_set.discard(gone)

    async def checkpoint_and_ack(self) -> None:
        extra: dict[str, Any] = {"recent_trained": self.recent_trained[-RECENT_IDS_KEPT:]}
        await anyio.to_thread.run_sync(lambda: self.trainer.checkpoint(self.checkpoint_root, extra=extra))
        for d in self.unacked:
            await d.ack()
        self.unacked.clear()


async def _collect(
    consumer: Consumer[ScoredTrajectory], size: int, timeout_s: float
) -> list[Delivery[ScoredTrajectory]]:
    batch: list[Delivery[ScoredTrajectory]] = []
    deadline = time.monotonic() + timeout_s
    while len(batch) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and batch:
            break
        batch += await consumer.fetch(size - len(batch), timeout_s=max(0.2, min(2.0, remaining)))
    return batch


async def run(
    cfg: Any, js: JetStreamContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Train from the shared ``learner`` consumer until cancelled. ``cfg`` is an ``ops.config.Config``."""
    settings: LearnerSettings = cfg.learner
    ckpt_root = cfg.state / "checkpoints" / cfg.run
    trainer = await anyio.to_thread.run_sync(Trainer.resume, ckpt_root, cfg.policy_dir, settings)
    learner = Learner(trainer, settings, js, cfg.run, ckpt_root)
    await learner.sync_version()
    consumer = await Consumer(js, LEARNER, cfg.run, scored_decoder).bind()
    task_status.started()
    log.info(
        "learner_started",
        policy_version=learner.version,
        eta=settings.max_staleness,
        batch=settings.batch_size,
    )
    while True:
        batch = await _collect(consumer, settings.batch_size, settings.batch_timeout_s)
        for d in learner.unacked:
            await d.in_progress()
        keep, drops = learner.triage(batch)
        result, trained = await learner.step(keep) if keep else (None, [])
        stepped = result is not None and not result.skipped
        learner.unacked += keep
        if stepped and learner.trainer.publish_due():
            learner.trainer.version += 1
        if stepped and (learner.trainer.checkpoint_due() or learner.trainer.publish_due()):
            await learner.checkpoint_and_ack()
        if stepped and learner.trainer.publish_due():
            await learner.publish_weights()
        for r in drops + trained:
            await learner.pub.publish_async(
                subject("train", cfg.run), r, msg_id=f"{r.traj_id}:{r.fate}:{r.step}:{r.source}"
            )
        if result is not None:
            stats = StepStats(
                run=cfg.run,
                step=result.step,
                version=learner.version,
                loss=result.loss,
                samples=len(keep),
                dropped=len(drops),
                mean_reward=result.mean_reward,
                mean_ratio=result.stats.get("mean_ratio", 1.0),
                masked_fraction=result.stats.get("masked_fraction", 0.0),
                grad_norm=result.grad_norm,
                time=time.time(),
            )
            await learner.pub.publish_async(
                subject("train", cfg.run), stats, msg_id=f"{cfg.run}:step:{result.step}:{learner.version}"
            )
        await learner.pub.flush()
        for d in batch:
            if d not in keep:
                await d.ack()
        log.info(
            "learner_step",
            policy_version=learner.version,
            step=learner.trainer.step,
            trained=len(trained),
            dropped=len(drops),
            loss=round(result.loss, 4) if result else None,
            reward=round(result.mean_reward, 3) if result else None,
        )
