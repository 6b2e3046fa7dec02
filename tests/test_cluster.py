"""A 3-server JetStream cluster on loopback (``ops.cluster``) with R3 streams survives losing a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import nats
from nats.js import JetStreamContext

from ops.cluster import Cluster, Member, cluster_config
from schemas.codec import tasks_decoder
from schemas.task import TaskSample
from streams import policy
from streams.bus import Consumer, Publisher
from streams.topology import LAKE_TASKS, TASKS, ensure, subject
from tests.factories import task_sample

RUN = "cluster"


def sample(i: int) -> TaskSample:
    return task_sample(RUN, f"t{i:03d}")


def test_each_server_config_routes_to_every_other_member() -> None:
    members = [Member(f"rs-{i}", 4222 + i, 6222 + i) for i in range(3)]
    conf = cluster_config(members[1], members)
    assert 'server_name: "rs-1"' in conf and 'listen: "127.0.0.1:6223"' in conf
    assert '"nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6224"' in conf
    assert "jetstream: { enabled: true }" in conf and '6223"]' not in conf


async def publish_all(pub: Publisher, ids: range) -> None:
    """Publish with retries under the same id, as a producer does while the cluster elects a leader."""
    for i in ids:
        with anyio.fail_after(30):
            while True:
                try:
                    await pub.publish(subject("tasks", RUN), sample(i), msg_id=sample(i).msg_id)
                    break
                except Exception:  # noqa: BLE001 - leader lost or electing: retry, same id
                    await asyncio.sleep(0.1)


async def consume(js: JetStreamContext, want: int) -> list[str]:
    """Fetch and ack until ``want`` records arrived (retrying while leaders move)."""
    got: list[str] = []
    with anyio.fail_after(30):
        while len(got) < want:
            try:
                consumer = await Consumer(js, LAKE_TASKS, RUN, tasks_decoder).bind()
                while len(got) < want:
                    for d in await consumer.fetch(min(25, want - len(got)), timeout_s=1.0):
                        await d.ack_sync()
                        got.append(d.record.task.task_id)
            except Exception:  # noqa: BLE001 - consumer leader lost: bind again
                await asyncio.sleep(0.1)
    return got


async def test_a_three_server_cluster_keeps_serving_r3_streams_with_one_server_killed(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, size=3).start()
    try:
        await cluster.wait_ready()
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            js = nc.jetstream(timeout=5)
            await ensure(js, RUN, replicas=3)
            info = await js.stream_info(TASKS.name)
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert info.cluster.replicas is not None and len(info.cluster.replicas) == 2
            pub = Publisher(js, timeout_s=2.0)
            await publish_all(pub, range(50))
            before = await consume(js, 20)

            leader = info.cluster.leader  # the worst server to lose: the tasks stream's leader
            cluster.kill([m.name for m in cluster.members].index(str(leader)))

            await publish_all(pub, range(50, 100))
            after = await consume(js, 80)
            weights = await policy.publish_weights(js, RUN, 1, b"w" * 1000, step=1)
            assert await policy.fetch_weights(js, weights) == b"w" * 1000
            state = await js.stream_info(TASKS.name)
        finally:
            await nc.close()
    finally:
        cluster.stop()
    assert state.cluster is not None and state.cluster.leader not in (None, leader)
    assert state.state.messages == 100  # every retry stored once
    assert sorted(set(before + after)) == [sample(i).task.task_id for i in range(100)]
