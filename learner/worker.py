"""The learner process: scored trajectories in, new policy versions out.

Per batch: admit each sample through the staleness gate (``s = N - min version <= eta``; replay
samples are governed by importance truncation instead) and the flag policy (a sample the reward
group's security screen flagged is dropped with reason ``flagged``, trained as scored, or trained
with reward ``flagged_reward``: ``learner.flagged``), take one optimiser step on the admitted
ones, checkpoint when due, publish weights (object store, then KV), write a ``TrainRecord`` for
every sample and ack.

Crash safety, in numbered steps: (1) train; (2) checkpoint the model together with the ids it
trained and the ``trained`` records not yet published; (3) publish those records; (4) ack. Until
(2) a sample's message stays unacked (heartbeated) and its record unpublished, so a learner killed
with SIGKILL gets the message back and trains it again from the checkpoint that never saw it, with
one ``trained`` row in the end. After (2) the sample is in the checkpoint's ``recent_trained``: a
redelivery is dropped as a duplicate, and the restarted learner republishes the checkpoint's
pending records first (same ``Nats-Msg-Id``, and the lake removes duplicates by id), so a kill
between (2) and (3) loses no record. Drops touch no model state: published and acked at once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from agent_harness.model import PolicySettings
from learner.assemble import GroupBatcher
from learner.metrics import TRAIN_SAMPLES
from learner.settings import LearnerSettings, LossName
from learner.staleness import admit, staleness
from learner.trainer import StepResult, Trainer
from schemas.codec import scored_decoder
from schemas.train import DropReason, Fate, StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory
from streams import policy
from streams.bus import Consumer, Delivery, Publisher
from streams.topology import LEARNER, subject

log = structlog.get_logger(__name__)
RECENT_IDS_KEPT = 4096


@dataclass
class LearnerStats:
    """Where the learner's time went (for benchmarks and status): waiting for samples or working."""

    wait_s: float = 0.0  # collecting a batch
    busy_s: float = 0.0  # triage, training, checkpoint, publication, records, acks
    batches: int = 0

    @property
    def idle_fraction(self) -> float:
        total = self.wait_s + self.busy_s
        return self.wait_s / total if total else 0.0


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
        # ``trained`` records of steps not yet checkpointed (or checkpointed, not yet published)
        self.pending: list[TrainRecord] = []
        extra = trainer.resumed_extra
        recent = extra.get("recent_trained", [])
        self.recent_trained: list[str] = list(recent) if isinstance(recent, list) else []
        self._recent_set = set(self.recent_trained)
        self.resumed_records = msgspec.convert(extra.get("unpublished", []), list[TrainRecord])
        self.checkpointed_step = trainer.step
        self.published_step = trainer.step
        self.filtered_groups = 0  # uninformative groups dropped since the last step's stats
        self.published_at = time.monotonic()

    @property
    def version(self) -> int:
        return self.trainer.version

    def publish_due(self) -> bool:
        """Whether the steps or the seconds since the last publication call for a new version
        (``publish_every`` / ``publish_every_s``; never without a new step)."""
        steps = self.trainer.step - self.published_step
        if steps <= 0:
            return False
        every, every_s = self.settings.publish_every, self.settings.publish_every_s
        by_steps = every > 0 and steps >= every
        return by_steps or (every_s > 0 and time.monotonic() - self.published_at >= every_s)

    async def sync_version(self) -> None:
        """Versions continue after a restart: N = max(checkpoint version, announced version)."""
        announced = await policy.latest(self.js, self.run)
        if announced is not None and announced.version > self.trainer.version:
            self.trainer.adopt_version(announced.version)
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
        self,
        s: ScoredTrajectory,
        fate: Fate,
        reason: DropReason,
        step: int,
        *,
        loss: float = 0.0,
        detail: str = "",
    ) -> TrainRecord:
        return TrainRecord(
            run=self.run,
            traj_id=s.traj.traj_id,
            task_id=s.traj.task_id,
            fate=fate,
            reason=reason,
            detail=detail,
            learner_version=self.version,
            min_version=s.traj.oldest_version,
            staleness=staleness(self.version, s.traj),
            max_staleness=self.settings.max_staleness,
            step=step,
            reward=s.reward,
            source="replay" if s.replay else "online",
            loss=loss,
            time=time.time(),
        )

    def _drop_reason(self, s: ScoredTrajectory) -> tuple[DropReason, str]:
        """Why ``s`` cannot be trained now (``""`` when it can), with a free-text detail."""
        # Replays re-train lake trajectories on purpose (each replay has its own msg id).
        if not s.replay and s.traj.traj_id in self._recent_set:
            return "duplicate", "already trained"
        if not s.valid:
            return "invalid", s.invalid_reason[:500]
        if not s.traj.chunks:
            return "empty", "no chunks"
        if s.flags and self.settings.flagged == "drop":
            return "flagged", ", ".join(s.flags)
        if not s.replay and not admit(self.version, s.traj, self.settings.max_staleness)[0]:
            return "stale", ""
        return "", ""

    def triage(
        self, batch: Sequence[Delivery[ScoredTrajectory]]
    ) -> tuple[list[Delivery[ScoredTrajectory]], list[TrainRecord]]:
        """Split a batch into trainable deliveries and drop records (with reasons)."""
        keep: list[Delivery[ScoredTrajectory]] = []
        drops: list[TrainRecord] = []
        for d in batch:
            reason, detail = self._drop_reason(d.record)
            if reason:
                drops.append(self._record(d.record, "dropped", reason, self.trainer.step, detail=detail))
            else:
                keep.append(d)
        return keep, drops

    async def drop_uninformative(self, group: list[Delivery[ScoredTrajectory]]) -> None:
        """Dynamic sampling: a task group whose rewards are all equal trains nothing under a group
        baseline. Its members are dropped (a member with a reason of its own keeps that reason),
        published and acked at once: drops touch no model state."""
        records = []
        for d in group:
            reason, detail = self._drop_reason(d.record)
            if not reason:
                reason, detail = "uninformative", f"all {len(group)} of the group scored {d.record.reward:g}"
            records.append(self._record(d.record, "dropped", reason, self.trainer.step, detail=detail))
        await self.publish_records(records)
        for d in group:
            await d.ack()
        self.filtered_groups += 1

    def as_trained(self, s: ScoredTrajectory) -> ScoredTrajectory:
        """The sample as it trains: a flagged one under ``flagged = "negative"`` with its reward
        forced to ``flagged_reward`` (and no per-chunk rewards); any other as scored."""
        if s.flags and self.settings.flagged == "negative":
            return msgspec.structs.replace(s, reward=self.settings.flagged_reward, chunk_rewards=[])
        return s

    def _flag_detail(self, s: ScoredTrajectory) -> str:
        return f"flagged ({self.settings.flagged}): {', '.join(s.flags)}" if s.flags else ""

    async def step(
        self, keep: list[Delivery[ScoredTrajectory]]
    ) -> tuple[StepResult | None, list[TrainRecord]]:
        samples = [self.as_trained(d.record) for d in keep]
        sft = [s for s in samples if s.replay and s.replay_mode == "sft"]
        rest = [s for s in samples if not (s.replay and s.replay_mode == "sft")]
        result: StepResult | None = None
        records: list[TrainRecord] = []
        groups: list[tuple[list[ScoredTrajectory], LossName | None]] = [(sft, "sft"), (rest, None)]
        for group, loss in groups:
            if not group:
                continue
            step = functools.partial(self.trainer.train_step, group, loss=loss)
            done: StepResult = await anyio.to_thread.run_sync(step)
            result = done
            per = done.per_sample_loss or [done.loss] * len(group)
            for s, sample_loss in zip(group, per, strict=False):
                records.append(
                    self._record(
                        s, "trained", "", done.step, loss=float(sample_loss), detail=self._flag_detail(s)
                    )
                )
        for r in records:
            self._remember(r.traj_id)
        return result, records

    def _remember(self, traj_id: str) -> None:
        self.recent_trained.append(traj_id)
        self._recent_set.add(traj_id)
        if len(self.recent_trained) > RECENT_IDS_KEPT:
            gone = self.recent_trained.pop(0)
            self._recent_set.discard(gone)

    async def publish_records(self, records: Sequence[TrainRecord], *, count: bool = True) -> None:
        """Publish train records (idempotent: the msg id is the record's identity) and count them in
        ``rollstream_train_samples`` (``count=False``: a predecessor's records, which it may
        already have counted before it died)."""
        for r in records:
            await self.pub.publish_async(
                subject("train", self.run), r, msg_id=f"{r.traj_id}:{r.fate}:{r.step}:{r.source}"
            )
        await self.pub.flush()
        if count:
            for r in records:
                TRAIN_SAMPLES.labels(run=self.run, fate=r.fate, source=r.source).inc()

    async def republish_resumed(self) -> None:
        """Records the checkpoint holds that a killed predecessor may not have published."""
        if self.resumed_records:
            await self.publish_records(self.resumed_records, count=False)
            log.info("learner_records_republished", records=len(self.resumed_records))
            self.resumed_records = []

    async def checkpoint_and_ack(self) -> None:
        """Checkpoint (model, ids trained, records pending), then publish the records, then ack."""
        extra: dict[str, Any] = {
            "recent_trained": self.recent_trained[-RECENT_IDS_KEPT:],
            "unpublished": msgspec.to_builtins(self.pending),
        }
        await anyio.to_thread.run_sync(lambda: self.trainer.checkpoint(self.checkpoint_root, extra=extra))
        self.checkpointed_step = self.trainer.step
        await self.settle()

    async def settle(self) -> None:
        """Publish pending records and ack their messages; only when the model holds no step
        that a checkpoint has not saved."""
        if self.trainer.step != self.checkpointed_step:
            return
        await self.publish_records(self.pending)
        self.pending.clear()
        for d in self.unacked:
            await d.ack()
        self.unacked.clear()


async def run(
    settings: LearnerSettings,
    js: JetStreamContext,
    *,
    run: str,
    policy_dir: Path,
    checkpoint_root: Path,
    group_size: int,
    stats: LearnerStats | None = None,
    policy_settings: PolicySettings | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Train run ``run`` from the shared ``learner`` consumer until cancelled: resume from the last
    checkpoint under ``checkpoint_root`` (or the base policy at ``policy_dir``), assemble batches of
    whole groups of ``group_size`` (``producer.group_size``). ``stats``, when given, accumulates
    where the time went. ``policy_settings`` says how the model loads (dtype, device, attention)."""
    stats = stats if stats is not None else LearnerStats()
    resume = functools.partial(Trainer.resume, checkpoint_root, policy_dir, settings, policy_settings)
    trainer = await anyio.to_thread.run_sync(resume)
    learner = Learner(trainer, settings, js, run, checkpoint_root)
    await learner.sync_version()
    await learner.republish_resumed()
    consumer = await Consumer(js, LEARNER, run, scored_decoder).bind()
    batcher = GroupBatcher(
        consumer,
        batch_size=settings.batch_size,
        group_size=group_size,
        group_timeout_s=settings.group_timeout_s,
        batch_timeout_s=settings.batch_timeout_s,
        on_filtered=learner.drop_uninformative if settings.dynamic_sampling else None,
    )
    task_status.started()
    log.info(
        "learner_started",
        policy_version=learner.version,
        eta=settings.max_staleness,
        batch=settings.batch_size,
        dynamic_sampling=settings.dynamic_sampling,
        group_size=group_size,
    )
    while True:
        t0 = time.monotonic()
        batch = await batcher.next_batch()
        t1 = time.monotonic()
        for d in learner.unacked:
            await d.in_progress()
        await _one_batch(learner, batch, run, wait_s=t1 - t0)
        stats.wait_s += t1 - t0
        stats.busy_s += time.monotonic() - t1
        stats.batches += 1


async def _one_batch(
    learner: Learner, batch: list[Delivery[ScoredTrajectory]], run: str, *, wait_s: float = 0.0
) -> None:
    """Triage, train, checkpoint/publish when due, account for every sample, ack what is safe.
    ``wait_s``: how long the learner waited for ``batch`` (in the step's record, for idle time)."""
    started = time.monotonic()
    keep, drops = learner.triage(batch)
    result, trained = await learner.step(keep) if keep else (None, [])
    stepped = result is not None and not result.skipped
    learner.unacked += keep
    learner.pending += trained
    trainer, settings = learner.trainer, learner.settings
    # "due" counts steps since the last publication/checkpoint: one batch may take two steps (SFT
    # replay and the rest), so a step number that is a multiple of k can be skipped over.
    publish = stepped and learner.publish_due()
    if publish:
        trainer.next_version()
        learner.published_step, learner.published_at = trainer.step, time.monotonic()
    if publish or (stepped and trainer.step - learner.checkpointed_step >= settings.checkpoint_every):
        await learner.checkpoint_and_ack()
    else:
        await learner.settle()  # nothing new in the model since the checkpoint: settle at once
    if publish:
        await learner.publish_weights()
    await learner.publish_records(drops)
    if result is not None:
        stats = StepStats(
            run=run,
            step=result.step,
            version=learner.version,
            loss=result.loss,
            samples=len(keep),
            dropped=len(drops),
            mean_reward=result.mean_reward,
            mean_ratio=result.stats.mean_ratio,
            masked_fraction=result.stats.masked_fraction,
            grad_norm=result.grad_norm,
            time=time.time(),
            filtered_groups=learner.filtered_groups,
            wait_s=wait_s,
            busy_s=time.monotonic() - started,
        )
        learner.filtered_groups = 0
        await learner.pub.publish_async(
            subject("train", run), stats, msg_id=f"{run}:step:{result.step}:{learner.version}"
        )
    await learner.pub.flush()
    for d in batch:
        if d not in keep:
            await d.ack()
    log.info(
        "learner_step",
        policy_version=learner.version,
        step=trainer.step,
        trained=len(trained),
        dropped=len(drops),
        flagged=sum(bool(d.record.flags) for d in batch),
        loss=round(result.loss, 4) if result else None,
        reward=round(result.mean_reward, 3) if result else None,
    )
