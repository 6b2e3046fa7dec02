"""Weight sync that scales: readers move to the newest version in one pass, even when the weights
of the version they were reading are deleted under them; the learner publishes on a cadence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext

from learner.settings import LearnerSettings
from learner.trainer import Trainer
from learner.worker import Learner
from streams import policy
from streams.topology import ensure

RUN = "ws"


async def test_a_burst_of_versions_is_fetched_in_one_pass_to_the_newest(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    for v in range(1, 21):  # the learner's burst after a warm start, deleting as it goes
        await policy.publish_weights(js, RUN, v, bytes([v]) * 50_000, step=v)
        if v > 4:
            await policy.delete_weights(js, RUN, v - 4)
    found = await policy.fetch_newest(js, RUN, newer_than=0)
    assert found is not None
    record, data = found
    assert record.version == 20
    assert data == bytes([20]) * 50_000
    assert await policy.fetch_newest(js, RUN, newer_than=20) is None


async def test_a_fetch_whose_weights_were_deleted_moves_on_to_the_newer_version(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    await policy.publish_weights(js, RUN, 3, b"3" * 1000, step=3)
    await policy.delete_weights(js, RUN, 3)  # announced, then gone (the learner moved on)

    async def publish_newer() -> None:
        await anyio.sleep(0.3)
        await policy.publish_weights(js, RUN, 4, b"4" * 1000, step=4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_newer)
        with anyio.fail_after(10):
            found = await policy.fetch_newest(js, RUN, newer_than=0)
    assert found is not None
    assert found[0].version == 4
    assert found[1] == b"4" * 1000


async def test_weights_gone_with_nothing_newer_fail_with_a_clear_error(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    await policy.publish_weights(js, RUN, 1, b"1" * 1000, step=1)
    await policy.delete_weights(js, RUN, 1)
    with anyio.fail_after(10), pytest.raises(policy.FetchFailed, match="after 2 attempts"):
        await policy.fetch_newest(js, RUN, newer_than=0, attempts=2)


def _learner(js: JetStreamContext, tiny_policy: Path, **settings: Any) -> Learner:
    s = LearnerSettings(**settings)
    return Learner(Trainer(tiny_policy, s), s, js, RUN, tiny_policy)


async def test_publication_is_due_after_publish_every_steps(js: JetStreamContext, tiny_policy: Path) -> None:
    learner = _learner(js, tiny_policy, publish_every=3)
    learner.trainer.step = 2
    assert not learner.publish_due()
    learner.trainer.step = 3
    assert learner.publish_due()


async def test_publication_by_seconds_waits_out_the_interval_and_needs_a_new_step(
    js: JetStreamContext, tiny_policy: Path
) -> None:
    learner = _learner(js, tiny_policy, publish_every=0, publish_every_s=0.2)
    learner.trainer.step = 50  # a burst of steps: still one version per interval
    assert not learner.publish_due()
    await anyio.sleep(0.25)
    assert learner.publish_due()
    learner.published_step = 50
    assert not learner.publish_due()  # no new step since


def test_no_publication_trigger_at_all_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="publish_every_s"):
        msgspec.convert({"publish_every": 0}, LearnerSettings)
