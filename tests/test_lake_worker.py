"""The lake worker in-process on a real broker: a record the lake cannot hold is dead-lettered."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import msgspec
from nats.js import JetStreamContext

from consumers import lake
from consumers.lake import query
from consumers.lake.settings import LakeSettings
from schemas.codec import dlq_decoder
from streams.bus import Publisher
from streams.topology import DLQ, ensure, subject
from tests.factories import lake_trajectory

RUN = "lakepoison"


async def test_a_record_with_an_unusable_run_name_is_dead_lettered_and_the_rest_is_written(
    js: JetStreamContext, tmp_path: Path
) -> None:
    root = tmp_path / "lake"
    await ensure(js, RUN)
    good = lake_trajectory(1)
    bad = msgspec.structs.replace(good, traj=msgspec.structs.replace(good.traj, traj_id="x", run="../etc"))
    pub = Publisher(js)
    await pub.publish(subject("scored", RUN), bad, msg_id="bad")
    await pub.publish(subject("scored", RUN), good, msg_id="good")
    dlq = await js.pull_subscribe(subject("dlq.lake", RUN), stream=DLQ.name)
    async with anyio.create_task_group() as tg:
        settings = LakeSettings(flush_interval_s=0.2)
        await tg.start(functools.partial(lake.run, settings, js, run=RUN, root=root))
        [msg] = await dlq.fetch(1, timeout=10)
        with anyio.fail_after(10):
            while not (root / "trajectories").exists():  # noqa: ASYNC110
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    letter = dlq_decoder.decode(msg.data)
    assert letter.stage == "lake" and "lake: run '../etc' must match" in letter.reason
    ids = query(root, "SELECT traj_id FROM trajectories")["traj_id"].to_pylist()
    assert ids == [good.traj.traj_id]
