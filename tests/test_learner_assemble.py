"""Batches of whole task groups, with a timeout for stragglers (learner/assemble.py)."""

from __future__ import annotations

import time

import anyio
from nats.js import JetStreamContext

from learner.assemble import GroupBatcher, GroupBuffer
from schemas.codec import scored_decoder
from streams.bus import Consumer, Publisher
from streams.topology import LEARNER, ensure, subject
from tests.factories import LEARNER_RUN, group_member, scored

RUN = LEARNER_RUN  # the run of the ``scored`` samples


def buffer(
    batch: int = 8, group: int = 4, group_timeout: float = 10.0, batch_timeout: float = 5.0
) -> GroupBuffer[str]:
    return GroupBuffer(
        key=lambda item: (item.split(".")[0], group),
        batch_size=batch,
        group_size=group,
        group_timeout_s=group_timeout,
        batch_timeout_s=batch_timeout,
    )


def test_a_batch_holds_whole_groups_in_the_order_they_completed() -> None:
    buf = buffer()
    # three groups of four arrive interleaved; c completes last and only partly by t=3
    for t, item in enumerate(["a.0", "b.0", "c.0", "a.1", "b.1", "a.2", "b.2", "c.1", "b.3", "a.3"]):
        assert buf.take(float(t)) == []  # never 8 ready samples before the last add
        buf.add(item, float(t))
    batch = buf.take(9.0)
    assert sorted(batch) == ["a.0", "a.1", "a.2", "a.3", "b.0", "b.1", "b.2", "b.3"]
    assert [i.split(".")[0] for i in buf.items()] == ["c", "c"]
    assert buf.stats.complete == 2 and buf.stats.stragglers == 0


def test_an_incomplete_group_waits_for_its_stragglers_until_the_group_timeout() -> None:
    buf = buffer(batch=4, group_timeout=10.0, batch_timeout=0.5)
    for item in ["s.0", "s.1", "s.2"]:
        buf.add(item, 0.0)
    assert buf.take(9.9) == []  # one member still missing, timeout not reached
    assert buf.next_deadline(9.9) == 10.0
    assert buf.take(10.2) == []  # released as a straggler group, but the batch is not due yet
    assert sorted(buf.take(10.6)) == ["s.0", "s.1", "s.2"]
    assert buf.stats.stragglers == 1
    buf.add("s.3", 11.0)  # the straggler, after its group left: a new entry, same rules
    assert buf.take(20.0) == []
    assert buf.take(21.6) == ["s.3"]


def test_a_late_member_joins_its_group_while_the_group_is_still_held() -> None:
    buf = buffer(batch=8, group_timeout=1.0, batch_timeout=5.0)
    for item in ["g.0", "g.1"]:
        buf.add(item, 0.0)
    assert buf.take(2.0) == []  # released (timeout) but below batch size, batch not due
    buf.add("g.2", 3.0)
    assert sorted(buf.take(6.1)) == ["g.0", "g.1", "g.2"]


def test_fewer_ready_samples_than_a_batch_are_trained_after_the_batch_timeout() -> None:
    buf = buffer(batch=8, batch_timeout=5.0)
    for k in range(4):
        buf.add(f"a.{k}", 1.0)
    assert buf.take(5.9) == []
    assert len(buf.take(6.0)) == 4


def test_dynamic_sampling_sets_uniform_groups_aside_and_fills_the_batch_from_informative_ones() -> None:
    # items "<group>.<k>.<reward>": groups u and v score 1 for all, w mixes 0 and 1, x mixes too
    buf = GroupBuffer(
        key=lambda item: (item.split(".")[0], 4),
        batch_size=8,
        group_size=4,
        group_timeout_s=10.0,
        batch_timeout_s=5.0,
        informative=lambda members: len({m.split(".")[2] for m in members}) > 1,
    )
    for g, rewards in [("u", "1111"), ("w", "0101"), ("v", "1111"), ("x", "0011")]:
        for k, r in enumerate(rewards):
            buf.add(f"{g}.{k}.{r}", 0.0)
    batch = buf.take(0.0)
    assert sorted({i.split(".")[0] for i in batch}) == ["w", "x"]  # a full batch without u and v
    assert [sorted({i.split(".")[0] for i in g}) for g in buf.take_filtered()] == [["u"], ["v"]]
    assert buf.take_filtered() == [] and buf.stats.filtered == 2 and buf.stats.complete == 2
    # an incomplete group is judged only once it is ready (here: at its group timeout)
    for k in range(2):
        buf.add(f"y.{k}.0", 20.0)
    assert buf.take(29.0) == [] and buf.take_filtered() == []
    assert buf.take(30.0) == [] and [len(g) for g in buf.take_filtered()] == [2]


def test_without_groups_the_buffer_is_a_plain_size_or_timeout_collector() -> None:
    buf = buffer(batch=3, group=1, batch_timeout=5.0)
    for k in range(5):
        buf.add(f"x.{k}", 0.0)  # same key: ignored when group_size is 1
    assert buf.take(0.0) == ["x.0", "x.1", "x.2"]
    assert buf.take(1.0) == []
    assert buf.take(5.0) == ["x.3", "x.4"]


async def test_the_learner_consumer_yields_whole_groups_and_releases_a_straggler_group(
    js: JetStreamContext,
) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    # groups 1 and 2 complete (interleaved), group 3 misses one member, group 4 complete
    order = [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3), (2, 3), (3, 2)]
    order += [(4, k) for k in range(4)]
    for task, k in order:
        rec = group_member(task, k)
        await pub.publish(subject("scored", RUN), rec, msg_id=rec.traj.traj_id)
    consumer = await Consumer(js, LEARNER, RUN, scored_decoder).bind()
    batcher = GroupBatcher(consumer, batch_size=8, group_size=4, group_timeout_s=3.0, batch_timeout_s=1.0)
    t0 = time.monotonic()
    batches = []
    with anyio.fail_after(30):
        while sum(len(b) for b in batches) < len(order):
            batch = await batcher.next_batch()
            batches.append(batch)
            for d in batch:
                await d.ack()
    groups = [sorted({d.record.traj.task_id for d in b}) for b in batches]
    sizes = [
        [sum(d.record.traj.task_id == g for d in b) for g in gs]
        for b, gs in zip(batches, groups, strict=True)
    ]
    # t1 and t2 complete first; t4 completes but is alone (batch timeout); t3 waits for its
    # missing member until the group timeout and is trained with the three that arrived
    assert groups == [["t1", "t2"], ["t4"], ["t3"]]
    assert sizes == [[4, 4], [4], [3]]
    assert time.monotonic() - t0 >= 3.0  # the straggler group waited out its timeout
    assert batcher.stats.complete == 3 and batcher.stats.stragglers == 1


async def test_trajectories_of_tasks_without_groups_are_never_held_back(js: JetStreamContext) -> None:
    await ensure(js, RUN)
    pub = Publisher(js)
    no_task = scored(12, 0)
    records = [group_member(10, 0, group_size=1), group_member(11, 0, group_size=1), no_task]
    for rec in records:
        await pub.publish(subject("scored", RUN), rec, msg_id=rec.traj.traj_id)
    consumer = await Consumer(js, LEARNER, RUN, scored_decoder).bind()
    batcher = GroupBatcher(consumer, batch_size=3, group_size=4, group_timeout_s=60.0, batch_timeout_s=60.0)
    with anyio.fail_after(20):  # far below either timeout: three lone samples make a full batch
        batch = await batcher.next_batch()
    assert sorted(d.record.traj.task_id for d in batch) == ["t10", "t11", "t12"]
