"""Poison and oversize on every stream: each lands in the dead-letter subject with a reason, or is
refused before it is stored; the consumer keeps going and the counts are exact."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext

from schemas.codec import (
    dlq_decoder,
    encode,
    raw_traj_decoder,
    scored_decoder,
    tasks_decoder,
    train_decoder,
)
from schemas.dlq import DeadLetter
from schemas.task import Task, TaskSample
from schemas.train import TrainRecord
from schemas.trajectory import ScoredTrajectory, Trajectory
from streams.bus import (
    MSG_ID,
    Consumer,
    Delivery,
    Publisher,
    RecordTooLarge,
    broker_limit,
    headers_size,
    serve,
)
from streams.server import NatsServer
from streams.topology import DLQ, LAKE_TRAIN, LEARNER, REWARD, ROLLOUT, ConsumerSpec, ensure, subject
from tests.factories import trajectory

RUN = "poison"
GOOD = 5


def task_sample(i: int, instruction: str = "write hi") -> TaskSample:
    return TaskSample(run=RUN, task=Task(task_id=f"t{i}", family="files", instruction=instruction))


def traj(i: int, text: str = "") -> Trajectory:
    return trajectory(run=RUN, task_id=f"t{i}", prompt=[1], abort_reason=text)


def scored(i: int, text: str = "") -> ScoredTrajectory:
    return ScoredTrajectory(traj=traj(i), reward=1.0, verifier_output=text)


def train_record(i: int, text: str = "") -> TrainRecord:
    return TrainRecord(
        run=RUN, traj_id=f"{RUN}:t{i}:0", task_id=f"t{i}", fate="trained", reason="", detail=text,
        learner_version=1, min_version=1, staleness=0, max_staleness=2, step=i, reward=1.0,
    )  # fmt: skip


@dataclass(frozen=True)
class Lane:
    """One stream as a consumer group sees it: subject kind, its consumer, its records."""

    kind: str
    spec: ConsumerSpec
    decoder: msgspec.msgpack.Decoder[Any]
    make: Any  # (i, filler text) -> a good record of this stream
    wrong: Any  # a record of another stream


LANES = (
    Lane("tasks", ROLLOUT, tasks_decoder, lambda i, t="": task_sample(i, t or "go"), train_record(0)),
    Lane("raw", REWARD, raw_traj_decoder, traj, task_sample(0)),
    Lane("scored", LEARNER, scored_decoder, scored, traj(0)),
    Lane("train", LAKE_TRAIN, train_decoder, train_record, task_sample(0)),
)


async def raw_oversize_publish(server: NatsServer, subj: str, size: int) -> str:
    """Publish ``size`` bytes with the plain NATS protocol (no client-side check); the server's answer."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        await reader.readline()  # INFO
        connect = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1}
        # The server judges the size from the PUB line and hangs up at once, before any body
        # (sending the body as well only races the reset).
        writer.write(f"CONNECT {json.dumps(connect)}\r\nPUB {subj} {size}\r\n".encode())
        await writer.drain()
        with anyio.fail_after(10):
            while line := await reader.readline():
                if line.startswith(b"-ERR"):
                    return line.decode().strip()
        return "connection closed without an error"
    finally:
        writer.close()


async def dead_letters(js: JetStreamContext, stage: str) -> list[DeadLetter]:
    sub = await js.pull_subscribe(subject(f"dlq.{stage}", RUN), stream=DLQ.name)
    letters: list[DeadLetter] = []
    while batch := await fetch_or_empty(sub):
        letters += [dlq_decoder.decode(m.data) for m in batch]
    await sub.unsubscribe()
    return letters


async def fetch_or_empty(sub: Any) -> list[Any]:
    try:
        return list(await sub.fetch(50, timeout=0.5))
    except TimeoutError:
        return []


@pytest.mark.parametrize("lane", LANES, ids=lambda lane: lane.kind)
async def test_poison_and_oversize_on_each_stream_are_isolated_and_counted_exactly(
    lane: Lane, js: JetStreamContext, nats_server: NatsServer
) -> None:
    await ensure(js, RUN)
    subj, pub = subject(lane.kind, RUN), Publisher(js)
    limit = broker_limit(js)
    await js.publish(subj, random.Random(lane.kind).randbytes(300))  # random bytes
    await pub.publish(subj, lane.wrong, msg_id=f"wrong-{lane.kind}")  # a record of the wrong type
    huge = lane.make(99, "x" * limit)
    size = len(encode(huge)) + headers_size({MSG_ID: "huge"})
    with pytest.raises(RecordTooLarge, match=rf"is {size:,} bytes, over the broker limit of {limit:,} "):
        await pub.publish(subj, huge, msg_id="huge")
    assert "Maximum Payload" in await raw_oversize_publish(nats_server, subj, limit + 1)
    for i in range(GOOD):
        await pub.publish(subj, lane.make(i), msg_id=f"good-{lane.kind}-{i}")

    consumer = await Consumer(js, lane.spec, RUN, lane.decoder).bind()
    got: list[Any] = []
    while batch := await consumer.fetch(4, timeout_s=1):
        got += [d.record for d in batch]
        for d in batch:
            await d.ack()

    assert got == [lane.make(i) for i in range(GOOD)]
    assert (consumer.stats.received, consumer.stats.dead_lettered) == (GOOD + 2, 2)
    assert (await js.stream_info(lane.spec.stream)).state.messages == GOOD + 2  # nothing oversized stored
    letters = await dead_letters(js, lane.spec.group)
    assert len(letters) == 2
    assert all(x.reason.startswith("decode: ") and x.subject == subj for x in letters)
    assert letters[0].payload == random.Random(lane.kind).randbytes(300) and letters[0].payload_size == 300
    assert (
        "unknown record tag" in letters[1].reason
        and letters[1].headers["Nats-Msg-Id"] == f"wrong-{lane.kind}"
    )


async def test_a_handler_whose_output_is_too_large_dead_letters_its_input_at_once(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    for i in range(3):
        await pub.publish(subject("tasks", RUN), task_sample(i), msg_id=f"t{i}")
    consumer = await Consumer(js, ROLLOUT, RUN, tasks_decoder).bind()
    published: list[str] = []

    async def handle(d: Delivery[TaskSample]) -> None:
        text = "x" * broker_limit(js) if d.record.task.task_id == "t1" else ""
        await pub.publish(
            subject("raw", RUN), traj(int(d.record.task.task_id[1:]), text), msg_id=d.record.msg_id
        )
        published.append(d.record.task.task_id)
        await d.ack()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, consumer, 2, handle)
        with anyio.fail_after(20):
            while len(published) + consumer.stats.dead_lettered < 3:  # noqa: ASYNC110 - polls stats
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()

    assert sorted(published) == ["t0", "t2"]
    [letter] = await dead_letters(js, "rollout")
    assert letter.deliveries == 1 and "RecordTooLarge" in letter.reason and "broker limit" in letter.reason
    assert tasks_decoder.decode(letter.payload) == task_sample(1)
    assert await consumer.pending() == (0, 0, 0)


async def test_a_dead_letter_of_a_near_limit_message_is_cut_to_fit_the_broker(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    size = broker_limit(js) - 200
    await js.publish(subject("tasks", RUN), b"\xc1" * size)
    consumer = await Consumer(js, ROLLOUT, RUN, tasks_decoder).bind()
    assert await consumer.fetch(1, timeout_s=2) == []
    [letter] = await dead_letters(js, "rollout")
    assert letter.payload_size == size and 0 < len(letter.payload) < size
    assert "not msgpack" in letter.reason
