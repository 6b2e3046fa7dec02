"""Durable episodes on real parts: a rollout worker process SIGKILLed in the middle of a 6-turn
episode, its task redelivered to another worker process, which resumes the episode from its
durable chunks (reattaching to the live sandbox, or replaying into a fresh one once the dead
worker's lease lapsed). Real nats-server, real sandboxd on Docker, real worker processes; the
policy is a scripted engine (``tests/factories/rollout_proc.py``) whose tool calls are slow, so
the kill lands mid-episode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from consumers.durable import read_chunks
from consumers.reward import score
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxForbidden, SandboxNotFound
from schemas.codec import raw_traj_decoder
from schemas.episode import ChunkRecord, chunk_record_decoder
from schemas.task import Task, TaskSample
from schemas.trajectory import Trajectory
from streams.bus import Publisher
from streams.server import NatsServer
from streams.tasks import publish_samples
from streams.topology import ack_wait_for, ensure, subject
from tests.factories.rollout_proc import STEPS, step_command

pytestmark = pytest.mark.docker
RUN = "durable"
HEARTBEAT_S = 1.5  # ack wait 3 s, lease 4.5 s


def six_turn_task() -> Task:
    checks = " && ".join(f"test -f /work/step{n}" for n in range(STEPS))
    return Task(
        task_id="six-turns",
        family="scripted",
        instruction=f"Run the {STEPS} steps, one bash call each, then say you are done.",
        verify=[checks],
        max_turns=STEPS + 2,
    )


class Worker:
    """One rollout worker process (``tests/factories/rollout_proc.py``) stamping ``version``."""

    def __init__(self, url: str, policy: Path, version: int, log: Path) -> None:
        self.version, self.log = version, log
        args = [sys.executable, "-m", "tests.factories.rollout_proc", url, RUN, str(policy), str(version)]
        env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*args, str(HEARTBEAT_S)], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    async def ready(self, timeout_s: float = 120) -> None:
        """Wait until its consumer is bound (it logs ``rollout_started``)."""
        with anyio.fail_after(timeout_s):
            while b"rollout_started" not in self.log.read_bytes():
                assert self.proc.poll() is None, self.log.read_text()
                await anyio.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def workers(tmp_path: Path, nats_server: NatsServer, tiny_policy: Path) -> Iterator[Callable[[int], Worker]]:
    """Start rollout worker processes (by policy version); all are killed after the test."""
    started: list[Worker] = []

    def start(version: int) -> Worker:
        worker = Worker(nats_server.url, tiny_policy, version, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()


class Watch:
    """Chunk records and raw trajectories of the run, as the broker delivers them (core NATS)."""

    def __init__(self) -> None:
        self.chunks: list[ChunkRecord] = []
        self.raw: list[Trajectory] = []

    async def start(self, nc: NATS) -> None:
        async def on_chunk(msg: object) -> None:
            self.chunks.append(chunk_record_decoder.decode(msg.data))  # type: ignore[attr-defined]

        async def on_raw(msg: object) -> None:
            self.raw.append(raw_traj_decoder.decode(msg.data))  # type: ignore[attr-defined]

        await nc.subscribe(subject("chunks", RUN), cb=on_chunk)
        await nc.subscribe(subject("raw", RUN), cb=on_raw)

    async def until(self, ok: Callable[[], object], timeout_s: float) -> None:
        with anyio.fail_after(timeout_s):
            while not ok():  # noqa: ASYNC110 - the callbacks fill the lists
                await anyio.sleep(0.05)


async def publish_and_kill(
    nc: NATS, js: JetStreamContext, workers: list[Worker]
) -> tuple[Watch, Worker, float]:
    """With ``workers`` ready, publish the 6-turn task and SIGKILL the worker that took it once 2
    of its chunks are durable (its third tool call is running). Returns the watch, the worker
    killed and the time of the kill."""
    for worker in workers:
        await worker.ready()
    watch = Watch()
    await watch.start(nc)
    await publish_samples(js, Publisher(js), [TaskSample(run=RUN, task=six_turn_task())])
    await watch.until(lambda: len(watch.chunks) >= 2, 60)
    await anyio.sleep(0.3)  # into the next tool call
    [taker] = [w for w in workers if w.version == watch.chunks[0].chunk.policy_version]
    taker.kill()
    return watch, taker, time.monotonic()


def assert_resumed_whole(traj: Trajectory, before: list[ChunkRecord], old: int, new: int) -> None:
    """All 6 chunks, the ones made before the kill byte for byte with their original version."""
    assert [c.index for c in traj.chunks] == list(range(STEPS + 1))
    assert traj.status == "completed" and traj.resumed == 1
    killed = len(before)
    assert 2 <= killed < STEPS + 1
    assert [c.policy_version for c in traj.chunks] == [old] * killed + [new] * (STEPS + 1 - killed)
    for record in before:
        assert traj.chunks[record.chunk.index] == record.chunk
    assert msgspec.json.decode(traj.chunks[0].tool_args) == {"command": step_command(0)}
    assert (traj.min_version, traj.max_version) == (min(old, new), max(old, new))


async def test_a_rollout_worker_killed_mid_episode_is_resumed_in_its_live_sandbox(
    nc: NATS,
    js: JetStreamContext,
    sandbox_client: SandboxClient,
    workers: Callable[[int], Worker],
) -> None:
    await ensure(js, RUN, ack_wait_s={"rollout": ack_wait_for(HEARTBEAT_S)})
    pair = [workers(3), workers(4)]  # the other one resumes the episode within the lease
    watch, killed, _ = await publish_and_kill(nc, js, pair)
    before = list(watch.chunks)
    [other] = [w for w in pair if w is not killed]
    await watch.until(lambda: watch.raw, 90)
    await anyio.sleep(1.0)  # a second copy would arrive now
    assert len(watch.raw) == 1
    [traj] = watch.raw
    assert_resumed_whole(traj, before, killed.version, other.version)
    assert traj.sandbox_id == before[0].sandbox_id  # reattached, not rebuilt
    durable = await read_chunks(js, RUN, traj.traj_id)
    assert [r.chunk.index for r in durable] == list(range(STEPS + 1))
    assert durable[-1].final == "completed" and durable[-1].attempt == 2
    scored = await score(msgspec.structs.replace(traj, task=six_turn_task()), sandbox_client, 10.0)
    assert scored.valid and scored.reward == 1.0, scored.verifier_output


async def test_a_dead_workers_sandbox_closes_when_its_lease_lapses_and_the_episode_is_replayed(
    nc: NATS,
    js: JetStreamContext,
    sandbox_client: SandboxClient,
    workers: Callable[[int], Worker],
) -> None:
    await ensure(js, RUN, ack_wait_s={"rollout": ack_wait_for(HEARTBEAT_S)})
    watch, _, killed_at = await publish_and_kill(nc, js, [workers(3)])
    before = list(watch.chunks)
    old_sandbox = before[0].sandbox_id
    with anyio.fail_after(30):
        while True:  # the lease is 3 heartbeats: the sandbox must go within seconds
            try:  # without its token nobody can extend it: refused while it lives
                await sandbox_client.keepalive(old_sandbox, 600.0)
            except SandboxForbidden:
                await anyio.sleep(0.2)
                continue
            except SandboxNotFound:
                break
    closed_after = time.monotonic() - killed_at
    assert closed_after < 3 * HEARTBEAT_S + 2.0, closed_after
    await workers(4).ready()
    await watch.until(lambda: watch.raw, 90)
    [traj] = watch.raw
    assert_resumed_whole(traj, before, 3, 4)
    assert traj.sandbox_id != old_sandbox  # rebuilt by replaying the recorded calls
    scored = await score(msgspec.structs.replace(traj, task=six_turn_task()), sandbox_client, 10.0)
    assert scored.valid and scored.reward == 1.0, scored.verifier_output
