"""The typed layer's flow on a real nats-server: an overloaded stream (429), acks that never come,
fetches that return what is there without waiting for a full batch, a consumer nothing serves."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.js import JetStreamContext

from schemas.codec import tasks_decoder
from schemas.task import Task, TaskSample
from streams.bus import Consumer, Publisher
from streams.server import NatsServer
from streams.topology import LAKE_TASKS, TASKS, ConsumerSpec, ensure, subject

RUN = "flow"


def sample(i: int) -> TaskSample:
    return TaskSample(run=RUN, task=Task(task_id=f"t{i:04d}", family="files", instruction="go " * 200))


@pytest.fixture
def small_ingest_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server whose streams queue at most 20 inbound messages: a burst gets 429 too many requests."""
    conf = tmp_path / "small.conf"
    conf.write_text("jetstream { max_buffered_msgs: 20, max_buffered_size: 64KB }\n")
    server = NatsServer(store_dir=tmp_path / "js", log_file=tmp_path / "nats.log", config_file=conf).start()
    yield server
    server.stop()


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until the kernel shows it stopped (on a busy machine that takes a while)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().split()[2] != "T":
        assert time.monotonic() < deadline, "the broker did not stop"
        time.sleep(0.01)


async def stored(js: JetStreamContext) -> int:
    return int((await js.stream_info(TASKS.name)).state.messages)


async def test_publishes_the_stream_refuses_with_429_are_published_again_and_stored_once(
    small_ingest_server: NatsServer,
) -> None:
    nc = await nats.connect(small_ingest_server.url)
    try:
        js = nc.jetstream(timeout=5)
        await ensure(js, RUN)
        pub = Publisher(js)
        with anyio.fail_after(60):
            for i in range(500):
                await pub.publish_async(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
            await pub.flush()
        assert pub.republished > 0, "the burst should have overflowed the stream's ingest queue"
        assert await stored(js) == 500
    finally:
        await nc.close()


async def test_acks_that_never_come_are_settled_by_publishing_again_under_the_same_id(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await ensure(js, RUN)
    pub = Publisher(js, timeout_s=0.5)
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    freeze(pid)  # the broker stops answering: no ack comes
    thaw = threading.Timer(2.0, os.kill, (pid, signal.SIGCONT))
    try:
        thaw.start()
        for i in range(50):
            await pub.publish_async(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
        with anyio.fail_after(60):
            await pub.flush()
    finally:
        thaw.cancel()
        os.kill(pid, signal.SIGCONT)
    assert pub.republished == 50
    assert await stored(js) == 50  # the originals arrived too, and were de-duplicated


async def test_fetch_hands_out_what_is_there_without_waiting_for_a_full_batch(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    for i in range(3):
        await pub.publish(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
    consumer = await Consumer(js, LAKE_TASKS, RUN, tasks_decoder).bind()
    t0 = time.monotonic()
    got = await consumer.fetch(100, timeout_s=5.0)
    assert [d.record.task.task_id for d in got] == ["t0000", "t0001", "t0002"]
    assert time.monotonic() - t0 < 2.5


async def test_fetch_on_an_empty_consumer_returns_the_first_record_when_it_arrives(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    consumer = await Consumer(js, LAKE_TASKS, RUN, tasks_decoder).bind()

    async def publish_later() -> None:
        await anyio.sleep(0.3)
        await Publisher(js).publish(subject("tasks", RUN), sample(9), msg_id=sample(9).msg_id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_later)
        t0 = time.monotonic()
        got = await consumer.fetch(10, timeout_s=5.0)
    assert [d.record.task.task_id for d in got] == ["t0009"]
    assert time.monotonic() - t0 < 2.5
    await got[0].ack()
    assert await consumer.fetch(10, timeout_s=0.3) == []


async def test_fetch_from_a_consumer_nothing_serves_returns_nothing_and_does_not_hang(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    nobody = ConsumerSpec("nobody", TASKS.name, "rs.tasks.{run}")  # never created by ensure()
    consumer = await Consumer(js, nobody, RUN, tasks_decoder).bind()
    t0 = time.monotonic()
    assert await consumer.fetch(5, timeout_s=5.0) == []
    assert time.monotonic() - t0 < 2.5  # 503 no responders at once, then a short pause
