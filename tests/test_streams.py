"""The typed layer on a real nats-server: dedupe, dead-letter, redelivery, policy versions."""

from __future__ import annotations

import msgspec
import pytest
from nats.js import JetStreamContext

from schemas.codec import dlq_decoder, tasks_decoder
from schemas.task import TaskSample
from streams import policy
from streams.bus import Consumer, Publisher
from streams.topology import DLQ, ROLLOUT, TASKS, TopologyError, ensure, subject
from tests.factories import task_sample

RUN = "t1"


def sample(i: int) -> TaskSample:
    return task_sample(RUN, f"task-{i}", instruction="write hi to answer.txt")


async def test_ensure_is_idempotent(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    await ensure(js, RUN)
    info = await js.stream_info(TASKS.name)
    assert info.config.subjects == ["rs.tasks.>"]


async def test_bad_run_name_is_refused_with_a_clear_error(js: JetStreamContext) -> None:
    with pytest.raises(TopologyError, match="run name"):
        await ensure(js, "bad.run")


async def test_record_published_twice_with_the_same_id_is_stored_once(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    s = sample(1)
    first = await pub.publish(subject("tasks", RUN), s, msg_id=s.msg_id)
    second = await pub.publish(subject("tasks", RUN), s, msg_id=s.msg_id)
    assert second.duplicate and not first.duplicate
    info = await js.stream_info(TASKS.name)
    assert info.state.messages == 1


async def test_poison_goes_to_the_dead_letter_subject_and_the_consumer_keeps_going(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    await js.publish(subject("tasks", RUN), b"\x00\x01garbage")
    await js.publish(subject("tasks", RUN), msgspec.msgpack.encode({"kind": "traj.v1", "x": 1}))
    for i in range(3):
        await pub.publish(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
    consumer = await Consumer(js, ROLLOUT, RUN, tasks_decoder).bind()
    got = await consumer.fetch(10, timeout_s=2)
    assert [d.record.task.task_id for d in got] == ["task-0", "task-1", "task-2"]
    assert consumer.stats.dead_lettered == 2
    dlq = await js.pull_subscribe(subject("dlq.rollout", RUN), stream=DLQ.name)
    letters = [dlq_decoder.decode(m.data) for m in await dlq.fetch(10, timeout=2)]
    assert len(letters) == 2
    assert all(letter.reason.startswith("decode:") for letter in letters)


async def test_unacked_message_is_redelivered_then_dead_lettered_after_its_budget(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    s = sample(7)
    await Publisher(js).publish(subject("tasks", RUN), s, msg_id=s.msg_id)
    consumer = await Consumer(js, ROLLOUT, RUN, tasks_decoder, backoff_s=(0.05,)).bind()
    seen = 0
    for _ in range(ROLLOUT.max_deliver + 2):
        for d in await consumer.fetch(1, timeout_s=1):
            seen += 1
            await consumer.fail(d, "boom")
    assert seen == ROLLOUT.max_deliver
    assert consumer.stats.dead_lettered == 1
    assert await consumer.fetch(1, timeout_s=0.5) == []


async def test_weights_are_readable_once_their_version_is_announced(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    assert await policy.latest(js, RUN) is None
    data = b"w" * 300_000
    rec = await policy.publish_weights(js, RUN, 1, data, step=1)
    got = await policy.latest(js, RUN)
    assert got == rec
    assert await policy.fetch_weights(js, got) == data
