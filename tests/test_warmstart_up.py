"""The learner's start-up warm start on real parts (nats-server, Docker sandboxes, the lake writer,
torch): seed the lake with scripted-expert episodes, SFT on the successes, install version 1,
then train online from it; once only, also across a learner killed half-way."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from learner import worker
from learner.checkpoint import latest_checkpoint, read_state
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from learner.warmstart import (
    WARM_VERSION,
    cancellable_progress,
    expert_rows,
    prepare_warm_start,
    seed_missing,
    sft_steps,
)
from ops import pipeline
from ops.config import Config, load_config
from producers.seed import expert_ids
from streams import policy
from streams.topology import TRAJ, ensure, subject
from tests.factories import (
    BROKER_RUN,
    Broker,
    Session,
    assert_denied,
    login,
    make_policy,
    make_tiny_policy,
    scored,
    serve_sandbox_create,
)

RUN = "ws"
EPISODES = 8
STEPS = 5


def config(state: Path, **learner: Any) -> Config:
    sets = {"warm_start_steps": STEPS, "warm_start_batch": 4, "seed_episodes": EPISODES} | learner
    return load_config(
        None,
        [
            f'state_dir="{state}"',
            f"run={RUN}",
            "producer.levels=[1, 2]",
            "rollout.concurrency=2",  # the test sandboxd holds 3 sandboxes
            "lake.flush_interval_s=0.5",
            *(f"learner.{k}={v}" for k, v in sets.items()),
        ],
    )


async def warm_start(cfg: Config, js: JetStreamContext, nc: NATS, lake_wait_s: float = 180.0) -> Path | None:
    """The learner's warm start of ``cfg``'s run, as ``ops.pipeline`` starts it."""
    return await prepare_warm_start(
        cfg.learner,
        pipeline.seeding(cfg),
        js,
        nc,
        run=cfg.run,
        policy_dir=cfg.policy_dir,
        lake_root=cfg.lake_root,
        checkpoint_root=cfg.checkpoint_root,
        lake_wait_s=lake_wait_s,
    )


async def published(js: JetStreamContext) -> int:
    return (await js.stream_info(TRAJ.name)).state.messages


@pytest.mark.docker
async def test_warm_start_seeds_the_lake_installs_version_one_once_and_the_learner_resumes_from_it(
    js: JetStreamContext, nc: NATS, sandboxd_owner: str, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    await anyio.to_thread.run_sync(make_tiny_policy, cfg.policy_dir)
    await ensure(js, RUN)
    root = cfg.checkpoint_root
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.starter("lake", cfg, js, nc))

        path = await warm_start(cfg, js, nc, lake_wait_s=60)
        assert path is not None and latest_checkpoint(root) == path
        state = read_state(path)
        assert (state.version, state.step, state.extra) == (WARM_VERSION, 0, {"warm_start": True})
        rows = expert_rows(cfg.lake_root, RUN)
        expected = await expert_ids(cfg.producer, nc, EPISODES, run=RUN)
        assert set(rows) == set(expected)  # every episode is in the lake
        assert any(rows.values())  # and some succeeded: the SFT had demonstrations
        assert await published(js) == EPISODES

        # A second start: the run has its checkpoint, nothing is seeded or trained.
        mtime = (path / "state.json").stat().st_mtime_ns
        assert await warm_start(cfg, js, nc) is None
        assert (path / "state.json").stat().st_mtime_ns == mtime

        # A learner killed during the SFT (no checkpoint yet) restarts: no episode runs again and
        # the warm start ends with one checkpoint.
        shutil.rmtree(path)
        seeding = pipeline.seeding(cfg)
        seeded = await seed_missing(
            cfg.learner, seeding, js, nc, run=RUN, policy_dir=cfg.policy_dir, lake_root=cfg.lake_root
        )
        assert seeded == 0
        assert await warm_start(cfg, js, nc) == path
        assert [p.name for p in root.iterdir()] == [path.name]
        assert await published(js) == EPISODES

        # The learner then resumes from it and announces version 1 to the rollout workers.
        learner = functools.partial(
            worker.run,
            cfg.learner,
            js,
            run=RUN,
            policy_dir=cfg.policy_dir,
            checkpoint_root=root,
            group_size=cfg.producer.group_size,
        )
        await tg.start(learner)
        announced = await policy.latest(js, RUN)
        assert announced is not None and announced.version == WARM_VERSION
        tg.cancel_scope.cancel()


async def test_warm_start_disabled_seeds_nothing_and_writes_no_checkpoint(
    js: JetStreamContext, nc: NATS, tmp_path: Path
) -> None:
    cfg = config(tmp_path, warm_start_steps=0)
    await ensure(js, RUN)
    assert await warm_start(cfg, js, nc) is None
    assert await published(js) == 0
    assert latest_checkpoint(cfg.checkpoint_root) is None


async def test_a_cancelled_warm_start_stops_at_its_next_step(tmp_path: Path) -> None:
    make_policy(tmp_path / "base")
    trainer = Trainer(tmp_path / "base", LearnerSettings(lr=1e-2, loss="sft"))
    demos = [scored(i, 0) for i in range(4)]
    endless = 10**9
    job = functools.partial(
        sft_steps, trainer, demos, steps=endless, batch=2, on_step=cancellable_progress(endless)
    )
    with anyio.move_on_after(1) as scope:
        await anyio.to_thread.run_sync(job)
    assert scope.cancelled_caught
    assert 0 < trainer.step < endless  # the thread stopped (SIGTERM stops the learner mid-SFT)


async def request_served(session: Session, subject_: str, data: bytes) -> Any:
    """A request that waits (≤ 10 s) for the responder's subscription to be visible: once, under
    a loaded CI machine, the first request saw no responders right after the responder's flush."""
    with anyio.fail_after(10):
        while True:
            try:
                return await session.nc.request(subject_, data, timeout=3)
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.2)


async def test_learner_role_may_seed_scored_trajectories_through_sandboxd_but_not_publish_tasks(
    broker: Broker,
) -> None:
    sessions: dict[str, Session] = {r: await login(broker, r) for r in ("ops", "sandboxd", "learner")}
    try:
        await ensure(sessions["ops"].js, BROKER_RUN)
        await serve_sandbox_create(sessions["sandboxd"])
        learner = sessions["learner"]
        reply = await request_served(learner, "rs.sandbox.create", b"env")
        assert reply.data == b"created:env"
        await learner.js.publish(subject("scored", BROKER_RUN), b"x", headers={"Nats-Msg-Id": "scored:e-1"})
        assert await learner.permission_errors() == []
        for kind in ("tasks", "raw"):
            await assert_denied(
                learner,
                learner.deny_js.publish(subject(kind, BROKER_RUN), b"x"),
                "Publish",
                subject(kind, BROKER_RUN),
            )
    finally:
        for s in sessions.values():
            await s.nc.close()
