"""Acceptance 1: a lake writer killed with SIGKILL mid-batch; its redelivered records appear once.

The writer is a real process (``python -m ops.cli worker lake``) on a real nats-server. It is
killed after the first part of a flush is durable and before the flush acks anything, so the
broker redelivers the whole batch to the restarted writer, which writes it again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pyarrow.dataset as ds
from nats.js import JetStreamContext

from consumers.lake import query
from ops.config import load_config, to_toml
from schemas.trajectory import ScoredTrajectory
from streams.bus import Publisher
from streams.server import NatsServer
from streams.topology import LAKE_TRAJ, consumer_config, ensure, subject
from tests.factories import DAY, seeded_scored

RUN = "redeliver"
N = 160
CHUNKS = 6
REPO = Path(__file__).resolve().parents[1]


def big_scored(i: int) -> ScoredTrajectory:
    """A trajectory heavy enough that one flush of the batch takes a while."""
    return seeded_scored(
        i,
        run=RUN,
        reward=float(i % 2),
        commands=("ls",) * CHUNKS,
        logprob=None,
        vocab=(0, 50_000),
        sizes=(400, 200, 3000),
        obs_text="out " * 50,
        finished_at=DAY + i,
        scored_at=DAY + 1 + i,
    )


def start_writer(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "worker", "lake", "--config", str(config)],
        cwd=REPO,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def raw_rows(lake: Path, table: str) -> int:
    if not (lake / table).exists():
        return 0
    return ds.dataset(lake / table, format="parquet").count_rows()


async def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate`` (a broker or file-system fact: nothing to wait on as an event)."""
    with anyio.fail_after(timeout_s):
        while not await predicate():  # noqa: ASYNC110
            await anyio.sleep(poll_s)


async def test_a_writer_killed_mid_batch_redelivers_and_every_view_shows_each_trajectory_once(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        [
            f'state_dir="{tmp_path}"',
            f"run={RUN}",
            f'nats.url="{nats_server.url}"',
            f"lake.max_batch={N}",
            "lake.flush_interval_s=600",
        ],
    )
    config = tmp_path / "rollstream.toml"
    config.write_text(to_toml(cfg))
    lake, log = cfg.lake_root, tmp_path / "lake.log"
    await ensure(js, RUN)

    writer = start_writer(config, log)
    try:

        async def bound() -> bool:
            info = await js.consumer_info(LAKE_TRAJ.stream, LAKE_TRAJ.durable(RUN))
            return bool(info.num_waiting)

        await wait_for(bound, 60, "the writer to pull")
        # The writer's topology (ensure) is in place; shorten the ack wait so the kill is cheap to
        # recover from (a restarted writer gets the batch back after 2 s instead of 60 s).
        short = dataclasses.replace(consumer_config(LAKE_TRAJ, RUN), ack_wait=2.0)
        await js.add_consumer(LAKE_TRAJ.stream, short)
        pub = Publisher(js)
        records = [big_scored(i) for i in range(N)]
        for scored in records:
            await pub.publish_async(subject("scored", RUN), scored, msg_id=f"scored:{scored.traj.traj_id}")
        await pub.flush()

        # Kill as soon as the first part of the batch (chunks) is durable: before the flush acks.
        chunk_dir = lake / "chunks"
        with anyio.fail_after(60):
            while not any(chunk_dir.glob("run=*/date=*/part-*.parquet")):  # noqa: ASYNC110
                await anyio.sleep(0.001)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        info = await js.consumer_info(LAKE_TRAJ.stream, LAKE_TRAJ.durable(RUN))
        assert info.num_ack_pending == N, "the kill must land before the batch was acked"
        assert raw_rows(lake, "chunks") == N * CHUNKS  # durable but unacknowledged
        assert query(lake, "SELECT count(*) AS n FROM trajectories")["n"][0].as_py() < N
        await anyio.sleep(2.5)  # past the ack wait: the broker will redeliver the batch

        writer = start_writer(config, log)

        async def all_acked() -> bool:
            info = await js.consumer_info(LAKE_TRAJ.stream, LAKE_TRAJ.durable(RUN))
            return info.num_ack_pending == 0 and info.num_pending == 0

        await wait_for(all_acked, 60, "the restarted writer to ack the redelivered batch")
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=30)

    assert raw_rows(lake, "chunks") == 2 * N * CHUNKS  # the batch was written twice
    ids = {s.traj.traj_id for s in records}
    per_traj = query(lake, "SELECT traj_id, count(*) AS n FROM trajectories GROUP BY 1")
    assert set(per_traj["traj_id"].to_pylist()) == ids
    assert set(per_traj["n"].to_pylist()) == {1}
    chunks = query(lake, "SELECT traj_id, chunk_index, count(*) AS n FROM chunks GROUP BY 1, 2")
    assert chunks.num_rows == N * CHUNKS and set(chunks["n"].to_pylist()) == {1}
    rewards = query(lake, "SELECT sum(reward) AS r FROM trajectories")["r"][0].as_py()
    assert rewards == sum(s.reward for s in records)
    for view in ("train_log", "tasks", "train_steps", "filters"):
        assert query(lake, f"SELECT count(*) AS n FROM {view}")["n"][0].as_py() == 0
    assert "Traceback" not in log.read_text()
