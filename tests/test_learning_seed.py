"""Expert seeding on real parts: the scripted expert in real sandboxes, scored, published as SFT
replay, and trained by the learner outside the staleness gate."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from learner import worker
from ops import pipeline
from ops.config import load_config
from producers import seed
from schemas.codec import scored_decoder, train_decoder
from schemas.train import TrainRecord
from schemas.trajectory import ScoredTrajectory
from streams import policy
from streams.topology import TRAIN, TRAJ, ensure, subject
from tests.factories import make_tiny_policy

pytestmark = pytest.mark.docker
RUN = "sd"
EPISODES = 4


async def read_train_log(js: JetStreamContext, n: int) -> list[TrainRecord]:
    sub = await js.subscribe(subject("train", RUN), stream=TRAIN.name, ordered_consumer=True)
    out: list[TrainRecord] = []
    try:
        with anyio.fail_after(60):
            while len(out) < n:
                rec = train_decoder.decode((await sub.next_msg(timeout=60)).data)
                if isinstance(rec, TrainRecord):
                    out.append(rec)
    finally:
        await sub.unsubscribe()
    return out


async def read_scored(js: JetStreamContext, n: int) -> list[ScoredTrajectory]:
    sub = await js.subscribe(subject("scored", RUN), stream=TRAJ.name, ordered_consumer=True)
    out: list[ScoredTrajectory] = []
    try:
        while len(out) < n:
            msg = await sub.next_msg(timeout=10)
            rec = scored_decoder.decode(msg.data)
            assert isinstance(rec, ScoredTrajectory)
            out.append(rec)
    finally:
        await sub.unsubscribe()
    return out


async def test_expert_episodes_are_published_as_sft_replay_and_trained_past_the_staleness_bound(
    js: JetStreamContext, nc: NATS, sandboxd_owner: str, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        [
            f'state_dir="{tmp_path}"',
            f"run={RUN}",
            "producer.levels=[1, 2]",
            "learner.max_staleness=0",
            f"learner.batch_size={EPISODES}",
            "learner.batch_timeout_s=1",
        ],
    )
    await anyio.to_thread.run_sync(make_tiny_policy, cfg.policy_dir)
    await ensure(js, RUN)
    seeding = functools.partial(seed.run, pipeline.seeding(cfg), js, nc, run=RUN, policy_dir=cfg.policy_dir)
    report = await seeding(episodes=EPISODES, error_rate=0.0, concurrency=2)
    assert report.successes == EPISODES  # an expert that never errs solves every task, verified in Docker
    again = await seeding(episodes=EPISODES, error_rate=0.0)
    assert again.episodes == EPISODES  # the same ids again: the broker keeps one copy of each

    records = await read_scored(js, EPISODES)
    assert (await js.stream_info(TRAJ.name)).state.messages == EPISODES
    expected = await seed.expert_ids(cfg.producer, nc, EPISODES, run=RUN)
    assert {r.traj.traj_id for r in records} == set(expected)
    for r in records:
        assert (r.replay, r.replay_mode, r.traj.source, r.reward, r.valid) == (
            True,
            "sft",
            "expert",
            1.0,
            True,
        )
        assert r.traj.task_id.startswith("expert-files-") and r.traj.chunks
        assert r.traj.chunks[-1].tool_name == "submit"
        assert r.flags == [], r.flag_evidence  # screened (calls and sandbox probe): nothing risky

    # The learner is at version 3 and eta = 0: online samples of version 0 would be dropped as stale.
    weights = (cfg.policy_dir / "model.safetensors").read_bytes()
    await policy.publish_weights(js, RUN, 3, weights, step=0)
    async with anyio.create_task_group() as tg:
        learner = functools.partial(
            worker.run,
            cfg.learner,
            js,
            run=RUN,
            policy_dir=cfg.policy_dir,
            checkpoint_root=cfg.checkpoint_root,
            group_size=1,
        )
        await tg.start(learner)
        log = await read_train_log(js, EPISODES)
        tg.cancel_scope.cancel()
    assert {r.traj_id for r in log} == {r.traj.traj_id for r in records}
    for rec in log:
        assert (rec.fate, rec.source, rec.staleness, rec.max_staleness) == ("trained", "replay", 3, 0)
        assert rec.step == 1 and rec.loss > 0  # one SFT step on the four successful demonstrations
