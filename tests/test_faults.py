"""Fault injection against real nats-server processes: SIGKILL a consumer mid-batch, SIGKILL the broker.

This module is also the worker those tests kill: ``python -m tests.test_faults <url> <run> <hang_at>
<attempts_file>`` consumes task samples and, as its effect, publishes one trajectory per sample
with the sample's id as ``Nats-Msg-Id``, then acks.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas.codec import raw_traj_decoder, tasks_decoder
from schemas.task import Task, TaskSample
from schemas.trajectory import Trajectory
from streams.bus import Consumer, Publisher
from streams.server import NatsServer
from streams.topology import LAKE_TASKS, REWARD, TASKS, ConsumerSpec, consumer_config, ensure, subject

RUN = "faults"
# A short ack_wait so that the killed worker's messages come back within a second.
FAULT_GROUP = ConsumerSpec("fault", TASKS.name, "rs.tasks.{run}", ack_wait_s=1.0, max_deliver=10)
WORKER_BATCH = 10


def sample(i: int) -> TaskSample:
    return TaskSample(run=RUN, task=Task(task_id=f"t{i:03d}", family="files", instruction="go"))


def effect_of(s: TaskSample) -> Trajectory:
    return Trajectory(
        traj_id=s.msg_id, run=s.run, task_id=s.task.task_id, family="files", group_id=s.group_id,
        sample_idx=s.sample_idx, prompt_tokens=b"", chunks=[], status="completed", min_version=0,
        max_version=0,
    )  # fmt: skip


async def worker(url: str, run: str, hang_at: int, attempts: Path) -> None:
    """Consume, publish the effect, ack. After effect number ``hang_at`` hang without acking."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=5)
    consumer = await Consumer(js, FAULT_GROUP, run, tasks_decoder).bind()
    pub, done = Publisher(js), 0
    with attempts.open("a") as log:
        while True:
            for d in await consumer.fetch(WORKER_BATCH, timeout_s=0.5):
                log.write(f"{d.record.msg_id}\n")
                log.flush()
                await pub.publish(subject("raw", run), effect_of(d.record), msg_id=d.record.msg_id)
                done += 1
                if done == hang_at:  # effect durable, message unacked, rest of the batch unacked
                    attempts.with_suffix(".hung").write_text(d.record.msg_id)
                    await asyncio.sleep(3600)
                await d.ack()


def start_worker(url: str, hang_at: int, attempts: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "tests.test_faults", url, RUN, str(hang_at), str(attempts)]
    return subprocess.Popen(args, cwd=Path(__file__).parent.parent)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    with anyio.fail_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - polls another process or the broker
            await anyio.sleep(0.1)


async def drain(js: JetStreamContext, spec: ConsumerSpec, decoder: object) -> list[object]:
    """Every record the group's consumer holds, acked."""
    consumer = await Consumer(js, spec, RUN, decoder).bind()  # type: ignore[arg-type]
    out: list[object] = []
    while batch := await consumer.fetch(100, timeout_s=1.0):
        out += [d.record for d in batch]
        for d in batch:
            await d.ack()
    return out


async def test_a_consumer_killed_mid_batch_loses_nothing_and_its_effects_happen_once(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    n = 40
    await ensure(js, RUN)
    await js.add_consumer(FAULT_GROUP.stream, consumer_config(FAULT_GROUP, RUN))
    pub = Publisher(js)
    for i in range(n):
        await pub.publish(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
    attempts = tmp_path / "attempts.log"

    doomed = start_worker(nats_server.url, WORKER_BATCH + 5, attempts)
    try:
        await eventually(lambda: anyio.Path(attempts.with_suffix(".hung")).exists())
    finally:
        doomed.kill()
        doomed.wait()
    hung = attempts.with_suffix(".hung").read_text()

    survivor = start_worker(nats_server.url, 0, attempts)
    try:

        async def all_done() -> bool:
            pending, ack_pending, _ = await Consumer(js, FAULT_GROUP, RUN, tasks_decoder).pending()
            return (pending, ack_pending) == (0, 0)

        await eventually(all_done)
    finally:
        survivor.terminate()
        survivor.wait()

    tries = Counter(attempts.read_text().split())
    assert set(tries) == {sample(i).msg_id for i in range(n)}  # nothing lost
    assert tries[hung] == 2  # its effect was attempted again after the kill ...
    effects = await drain(js, REWARD, raw_traj_decoder)
    assert sorted(e.traj_id for e in effects) == sorted(tries)  # type: ignore[attr-defined]
    assert len(effects) == n  # ... and happened once


@asynccontextmanager
async def reconnecting(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        yield nc
    finally:
        await nc.close()


async def test_a_broker_killed_mid_stream_and_restarted_loses_nothing_it_acked(tmp_path: Path) -> None:
    n = 300
    server = NatsServer(store_dir=tmp_path / "js", log_file=tmp_path / "nats.log").start()
    acked: list[int] = []
    a_third_acked = anyio.Event()
    try:
        async with reconnecting(server.url) as nc:
            js = nc.jetstream(timeout=5)
            await ensure(js, RUN)
            pub = Publisher(js, timeout_s=1.0)

            async def produce() -> None:
                for i in range(n):
                    while True:
                        try:
                            await pub.publish(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
                            break
                        except Exception:  # noqa: BLE001 - broker down or electing: retry, same id
                            await asyncio.sleep(0.05)
                    acked.append(i)
                    if len(acked) == n // 3:
                        a_third_acked.set()
                    await asyncio.sleep(0.002)  # a steady stream, so that the kill lands mid-way

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)

                with anyio.fail_after(30):
                    await a_third_acked.wait()
                server.stop(sig_kill=True)
                acked_before_kill = list(acked)
                await anyio.sleep(0.5)
                server.start()

            got = await drain(js, LAKE_TASKS, tasks_decoder)
    finally:
        server.stop()
    ids = [s.task.task_id for s in got]  # type: ignore[attr-defined]
    assert n // 3 <= len(acked_before_kill) < n  # the kill did hit mid-stream
    assert {sample(i).task.task_id for i in acked_before_kill} <= set(ids)  # nothing acked was lost
    assert sorted(ids) == [sample(i).task.task_id for i in range(n)]  # and every retry stored once


if __name__ == "__main__":
    url_, run_, hang_at_, attempts_ = sys.argv[1:5]
    asyncio.run(worker(url_, run_, int(hang_at_), Path(attempts_)))
