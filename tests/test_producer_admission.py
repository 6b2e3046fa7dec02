"""Version-aware admission (issue 17): the producer keeps the samples anywhere in the pipeline
(rollout, reward and learner queues) within (η + 1) x batch x publish_every, so what it starts is
trained within the staleness bound, and rollout gets no work while the learner does not consume.
Real nats-server; the rollout and reward groups are played by the test (fetch, ack, publish)."""

from __future__ import annotations

import functools

import anyio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ops.config import Config
from ops.pipeline import pipeline_budget
from producers import tasks
from producers.settings import ProducerSettings
from schemas.codec import scored_decoder, tasks_decoder
from streams.bus import Consumer, Publisher, backlog
from streams.topology import LEARNER, ROLLOUT, ensure, subject
from tests.factories import scored

RUN = "admit"


async def settle(js: JetStreamContext, want: int) -> int:
    """The rollout group's backlog once it has stopped growing at ``want`` (or after 5 s)."""
    with anyio.move_on_after(5):
        while sum((await backlog(js, ROLLOUT, RUN))[:2]) < want:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    await anyio.sleep(1.5)  # three more producer polls: nothing beyond the budget may appear
    return sum((await backlog(js, ROLLOUT, RUN))[:2])


async def test_the_producer_fills_the_pipeline_budget_and_refills_only_as_the_learner_drains(
    js: JetStreamContext, nc: NATS
) -> None:
    await ensure(js, RUN)
    settings = ProducerSettings(source="builtin", group_size=2, max_inflight=16)
    budget = 8
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(tasks.run, settings, js, nc, run=RUN, pipeline_budget=budget))
        assert await settle(js, budget) == budget  # max_inflight (16) would allow more
        # the rollout and reward groups finish all 8: they now wait in the learner's queue
        rollout = await Consumer(js, ROLLOUT, RUN, tasks_decoder).bind()
        pub = Publisher(js)
        for i, d in enumerate(await rollout.fetch(budget, timeout_s=5)):
            record = scored(1000 + i, 0)
            await pub.publish(subject("scored", RUN), record, msg_id=record.traj.traj_id)
            await d.ack()
        assert await settle(js, 0) == 0  # the learner has not consumed: no new work (warm start)
        # the learner trains 4 of them: exactly 4 new samples are admitted
        learner = await Consumer(js, LEARNER, RUN, scored_decoder).bind()
        taken = await learner.fetch(4, timeout_s=5)
        assert len(taken) == 4
        for d in taken:
            await d.ack()
        assert await settle(js, 4) == 4
        tg.cancel_scope.cancel()


def test_the_budget_follows_the_learner_settings_and_needs_a_learner() -> None:
    cfg = Config()
    eta, batch, every = cfg.learner.max_staleness, cfg.learner.batch_size, cfg.learner.publish_every
    assert pipeline_budget(cfg, with_learner=True) == (eta + 1) * batch * every
    assert pipeline_budget(cfg, with_learner=False) is None
    off = Config(producer=ProducerSettings(admission=False))
    assert pipeline_budget(off, with_learner=True) is None
