"""A learner killed with SIGKILL mid-run and restarted: versions continue, no sample is trained
twice, no scored trajectory is lost. Real nats-server, a real learner process, real torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import anyio
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from learner.settings import LearnerSettings
from learner.trainer import Trainer
from learner.worker import Learner
from ops.config import load_config, to_toml
from schemas.codec import train_decoder
from schemas.train import StepStats, TrainRecord
from streams import policy
from streams.bus import Publisher
from streams.server import NatsServer
from streams.topology import LEARNER, TRAIN, consumer_config, ensure, subject
from tests.factories import LEARNER_RUN, make_policy, scored

RUN = LEARNER_RUN  # the run of the ``scored`` samples
SAMPLES = 48


def start_learner(config: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ops.cli", "worker", "learner", "--config", str(config)]
    return subprocess.Popen(
        args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]
    )


async def train_log(js: JetStreamContext) -> tuple[list[TrainRecord], list[StepStats]]:
    """Every record on the train log so far (an ephemeral ordered read from the start)."""
    sub = await js.subscribe(subject("train", RUN), stream=TRAIN.name, ordered_consumer=True)
    info = await js.stream_info(TRAIN.name)
    records: list[TrainRecord] = []
    steps: list[StepStats] = []
    try:
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            rec = train_decoder.decode(msg.data)
            (records if isinstance(rec, TrainRecord) else steps).append(rec)  # type: ignore[arg-type]
    finally:
        await sub.unsubscribe()
    return records, steps


async def wait_for(js: JetStreamContext, predicate: object, timeout_s: float) -> list[TrainRecord]:
    with anyio.fail_after(timeout_s):
        while True:
            records, _ = await train_log(js)
            if predicate(records):  # type: ignore[operator]
                return records
            await anyio.sleep(0.3)


async def test_learner_killed_mid_run_resumes_without_losing_or_retraining_samples(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        [
            f'state_dir="{tmp_path}"',
            f"run={RUN}",
            f'nats.url="{nats_server.url}"',
            "learner.max_staleness=1000",
            "learner.batch_size=2",
            "learner.batch_timeout_s=0.5",
            "learner.checkpoint_every=1",
            "learner.warm_start_steps=0",
        ],
    )
    make_policy(cfg.policy_dir)
    config = tmp_path / "rollstream.toml"
    config.write_text(to_toml(cfg))
    await ensure(js, RUN)
    pub = Publisher(js)
    for i in range(SAMPLES):
        await pub.publish(subject("scored", RUN), scored(i, 0), msg_id=f"scored:{i}")

    versions: list[int] = []

    async def watch_versions() -> None:
        while True:
            latest = await policy.latest(js, RUN)
            if latest is not None and (not versions or versions[-1] != latest.version):
                versions.append(latest.version)
            await anyio.sleep(0.05)

    log = tmp_path / "learner.log"
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_versions)
        proc = start_learner(config, log)
        try:
            before = await wait_for(js, lambda rs: sum(r.fate == "trained" for r in rs) >= 8, 90)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        version_at_kill = versions[-1]
        trained_at_kill = {r.traj_id for r in before if r.fate == "trained"}
        # Messages held by the dead process come back after ack_wait (minutes in production):
        # shorten it on the real broker so the test need not wait; the restart's ensure() puts it back.
        short = replace(consumer_config(LEARNER, RUN), ack_wait=1.0)
        await js.add_consumer(LEARNER.stream, ConsumerConfig.from_response(short.as_dict()))
        await anyio.sleep(2.5)
        proc = start_learner(config, log)
        try:
            wanted = {scored(i, 0).traj.traj_id for i in range(SAMPLES)}
            records = await wait_for(js, lambda rs: wanted <= {r.traj_id for r in rs}, 120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        tg.cancel_scope.cancel()

    assert len(trained_at_kill) < SAMPLES, "the kill came after everything was trained"
    trained = {(r.traj_id, r.step) for r in records if r.fate == "trained"}  # the lake's identity
    per_traj: dict[str, int] = {}
    for traj_id, _ in trained:
        per_traj[traj_id] = per_traj.get(traj_id, 0) + 1
    assert max(per_traj.values()) == 1, {t: n for t, n in per_traj.items() if n > 1}
    assert set(per_traj) == wanted  # every sample trained exactly once: none lost, none twice
    assert versions == sorted(versions), versions  # the announced version never went back
    assert versions[-1] > version_at_kill  # and training went on after the restart
    _, steps = await train_log(js)
    assert max(s.step for s in steps) >= len(trained) // 2


async def test_resumed_learner_holds_the_checkpointed_ids_and_unpublished_records(
    js: JetStreamContext, tmp_path: Path
) -> None:
    make_policy(tmp_path / "base")
    settings = LearnerSettings(batch_size=2)
    trainer = Trainer(tmp_path / "base", settings)
    learner = Learner(trainer, settings, js, RUN, tmp_path / "ckpt")
    samples = [scored(i, 0) for i in range(2)]
    await ensure(js, RUN)
    trainer.train_step(samples)
    learner._remember(samples[0].traj.traj_id)
    learner.pending.append(learner._record(samples[0], "trained", "", trainer.step))
    await learner.checkpoint_and_ack()  # checkpoint, then publish, then ack (nothing to ack here)

    resumed = Learner(
        Trainer.resume(tmp_path / "ckpt", tmp_path / "base", settings), settings, js, RUN, tmp_path
    )
    assert [(r.traj_id, r.fate, r.step) for r in resumed.resumed_records] == [
        (samples[0].traj.traj_id, "trained", 1)
    ]
    await resumed.republish_resumed()  # a second copy of the same record: the broker keeps one
    keep, drops = resumed.triage([_delivery(samples[0]), _delivery(samples[1])])
    assert [d.record.traj.traj_id for d in keep] == [samples[1].traj.traj_id]
    assert (drops[0].reason, drops[0].detail) == ("duplicate", "already trained")
    records, _ = await train_log(js)
    assert [(r.traj_id, r.step) for r in records] == [(samples[0].traj.traj_id, 1)]


def _delivery(record: object) -> object:
    from streams.bus import Delivery

    return Delivery(record=record, msg=None)  # type: ignore[arg-type]
