"""Durable episodes on real parts: a rollout worker process SIGKILLed in the middle of a 6-turn
episode, its task redelivered to another worker process, which resumes the episode from its
durable chunks (reattaching to the live sandbox, or replaying into a fresh one once the dead
worker's lease lapsed). Real nats-server, real sandboxd on Docker, real worker processes; the
policy is a scripted engine (``tests/factories/rollout_proc.py``) whose tool calls are slow, so
the kill lands mid-episode.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from consumers import reward
from consumers.durable import EpisodeJournal, Leases, read_chunks
from consumers.reward import score
from consumers.settings import RewardSettings
from learner import worker as learner_worker
from learner.settings import LearnerSettings
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxForbidden, SandboxNotFound
from schemas.arrays import pack_logprobs, pack_tokens, unpack_tokens
from schemas.codec import chunk_record_decoder, episode_sandbox_decoder, raw_traj_decoder
from schemas.episode import ChunkRecord
from schemas.sandbox import Created
from schemas.task import Task, TaskSample
from schemas.train import TrainRecord
from schemas.trajectory import Chunk, Trajectory
from streams.bus import Publisher
from streams.server import NatsServer
from streams.tasks import publish_samples
from streams.topology import EPISODES_BUCKET, LAKE_CHUNKS, ack_wait_for, ensure, episode_kv_key, subject
from tests.factories import BROKER_RUN, STEPS, Broker, assert_denied, login, read_train_log, step_command

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


async def test_a_rollout_worker_killed_mid_episode_is_resumed_in_its_live_sandbox_and_trained_once(
    nc: NATS,
    js: JetStreamContext,
    sandbox_client: SandboxClient,
    workers: Callable[[int], Worker],
    tiny_policy: Path,
    tmp_path: Path,
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
    [record] = await score_and_train(js, nc, tiny_policy, tmp_path / "checkpoints")
    assert (record.traj_id, record.fate, record.reward) == (traj.traj_id, "trained", 1.0)


async def score_and_train(
    js: JetStreamContext, nc: NATS, policy: Path, checkpoints: Path
) -> list[TrainRecord]:
    """Run the reward and learner workers until the learner accounted for a sample; every train
    record of the run then (one per sample it took)."""
    learner = functools.partial(
        learner_worker.run,
        LearnerSettings(batch_size=1, batch_timeout_s=1),
        js,
        run=RUN,
        policy_dir=policy,
        checkpoint_root=checkpoints,
        group_size=1,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(reward.run, RewardSettings(verify_timeout_s=10), js, nc, run=RUN))
        await tg.start(learner)
        with anyio.fail_after(120):
            while not await train_records(js):  # noqa: ASYNC110 - polling the broker
                await anyio.sleep(1.0)
        await anyio.sleep(2.0)  # a second account of the same episode would come now
        tg.cancel_scope.cancel()
    return await train_records(js)


async def train_records(js: JetStreamContext) -> list[TrainRecord]:
    """Every train record of the run so far (a fetch that finds none times out)."""
    try:
        return await read_train_log(js, RUN, 10, timeout_s=4)
    except nats.errors.TimeoutError:
        return []


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


async def test_only_the_rollout_role_journals_episodes_and_holds_their_sandbox_tokens(broker: Broker) -> None:
    ops, rollout, lake, reward = [await login(broker, r) for r in ("ops", "rollout", "lake", "reward")]
    await ensure(ops.js, BROKER_RUN)
    sample = TaskSample(run=BROKER_RUN, task=six_turn_task())
    leases = Leases(SandboxClient(rollout.nc), lease_s=5.0, every_s=1.0)
    journal = EpisodeJournal(rollout.js, Publisher(rollout.js), leases, sample)
    created = Created(
        sandbox_id="sbx-t:0123456789ab", owner="sbx-t", image="i", startup_ms=1.0, token="secret"
    )
    await journal.sandbox_created(created)
    first = Chunk(
        index=0,
        action_tokens=pack_tokens([5, 6]),
        action_logprobs=pack_logprobs([0.0, 0.0]),
        policy_version=7,
    )
    await journal.chunk_made(first, prompt=[1, 2, 3], final=None, abort_reason="")

    [record] = await read_chunks(rollout.js, BROKER_RUN, sample.msg_id)  # what a resume reads back
    assert record.chunk == first and unpack_tokens(record.prompt_tokens).tolist() == [1, 2, 3]
    key = episode_kv_key(BROKER_RUN, sample.msg_id)
    entry = await (await rollout.js.key_value(EPISODES_BUCKET)).get(key)
    assert episode_sandbox_decoder.decode(entry.value).token == "secret"
    sub = await lake.js.pull_subscribe_bind(
        durable=LAKE_CHUNKS.durable(BROKER_RUN), stream=LAKE_CHUNKS.stream
    )
    [msg] = await sub.fetch(1, timeout=3)
    assert chunk_record_decoder.decode(msg.data).chunk == first
    await msg.ack_sync(timeout=3)
    await journal.forget()
    assert await rollout.permission_errors() == [] and await lake.permission_errors() == []

    # No other role reads (or writes) the tokens.
    stream = f"KV_{EPISODES_BUCKET}"
    await assert_denied(reward, reward.deny_js.key_value(EPISODES_BUCKET), "Publish", "$JS.API.STREAM.INFO")
    direct = f"$JS.API.DIRECT.GET.{stream}.$KV.{EPISODES_BUCKET}.{key}"
    await assert_denied(reward, reward.nc.request(direct, b"", timeout=1), "Publish", direct)
    forged = reward.deny_js.publish(f"$KV.{EPISODES_BUCKET}.{key}", b"forged")
    await assert_denied(reward, forged, "Publish", f"$KV.{EPISODES_BUCKET}.")
    for session in (ops, rollout, lake, reward):
        await session.nc.close()
