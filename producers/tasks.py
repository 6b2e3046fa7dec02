"""The task producer: feeds ``rs.tasks.<run>`` while bounding in-flight work.

Every task goes into the task registry (KV ``rs_tasks``, ``streams.tasks``) before its samples are
published: the reward group verifies with that copy, never with the one a trajectory carries.

In-flight = samples waiting for or held by the rollout group (the consumer's pending plus
ack-pending counts), at most ``max_inflight``. With a learner, admission is also version-aware (as
AReaL's): the samples anywhere in the pipeline (rollout, reward and learner queues together) stay
within ``pipeline_budget`` = (η + 1) x batch x publish_every. The learner trains samples in about
the order they reach it, one version per ``batch x publish_every``, so a sample admitted behind
fewer than that many is trained at most η versions after the weights it starts with; and while
the learner does not consume (its warm start), rollout stops once the budget is full instead of
generating work that would expire. The producer's position is kept in KV so a restart does not
repeat tasks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from producers import families
from producers.families.base import TaskSandbox
from producers.jsonl import load_jsonl
from producers.settings import ProducerSettings
from sandboxd.client import SandboxClient
from schemas.task import Task, TaskSample
from streams.bus import Publisher, backlog
from streams.kv import kv_get, kv_put, retrying
from streams.tasks import publish_samples
from streams.topology import LEARNER, POLICY_BUCKET, REWARD, ROLLOUT, check_run

log = structlog.get_logger(__name__)


async def task_stream(
    settings: ProducerSettings, start: int, sandbox: TaskSandbox
) -> AsyncIterator[tuple[int, Task]]:
    """(index, task) pairs from the configured source, starting at ``start``: a JSONL file, or the
    endless stream of the family ``settings.source`` names, made ``family.batch`` at a time."""
    source = settings.source
    if source == "jsonl":
        tasks = load_jsonl(Path(settings.path))
        for i in range(start, len(tasks)):
            yield i, tasks[i]
        return
    family = families.for_source(source)
    if family is None:
        raise ValueError(f"producer.source = {source!r} names no task family")
    i = start
    while True:
        batch = await family.make_tasks(sandbox, settings, seed=settings.seed, start=i, count=family.batch)
        for task in batch:
            yield i, task
            i += 1


async def _load_cursor(js: JetStreamContext, run: str) -> int:
    # a broker fail-over is waited out
    value = await kv_get(js, POLICY_BUCKET, f"{check_run(run)}.producer_cursor", attempt_timeout_s=10.0)
    return int(value or b"0")


async def _save_cursor(js: JetStreamContext, run: str, cursor: int) -> None:
    # idempotent: the same cursor again
    await kv_put(
        js, POLICY_BUCKET, f"{check_run(run)}.producer_cursor", str(cursor).encode(), attempt_timeout_s=10.0
    )


async def pipeline_inflight(js: JetStreamContext, run: str) -> tuple[int, int]:
    """(samples held by or waiting for the rollout group, samples anywhere in the pipeline)."""

    async def counts() -> list[int]:
        return [sum((await backlog(js, spec, run))[:2]) for spec in (ROLLOUT, REWARD, LEARNER)]

    # a broker fail-over is waited out, as for every other broker call of a worker
    rollout, reward, learner = await retrying(counts, attempt_timeout_s=10.0)
    return rollout, rollout + reward + learner


def room_for(settings: ProducerSettings, rollout: int, pipeline: int, budget: int | None) -> int:
    """How many samples may be published now."""
    room = settings.max_inflight - rollout
    if budget is not None:
        room = min(room, budget - pipeline)
    return room


async def run(
    settings: ProducerSettings,
    js: JetStreamContext,
    nc: NATS,
    *,
    run: str,
    pipeline_budget: int | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Publish task samples of run ``run``, at most ``settings.max_inflight`` outstanding in the
    rollout group and, with ``pipeline_budget``, at most that many in the whole pipeline (see the
    module docstring), until cancelled or done."""
    pub = Publisher(js)
    cursor = await _load_cursor(js, run)
    tasks = task_stream(settings, cursor, SandboxClient(nc))
    group = settings.group_size
    task_status.started()
    log.info(
        "producer_started",
        cursor=cursor,
        source=settings.source,
        max_inflight=settings.max_inflight,
        pipeline_budget=pipeline_budget,
    )
    published = 0
    while settings.total == 0 or cursor < settings.total:
        inflight, pipeline = await pipeline_inflight(js, run)
        # a group larger than the budget still goes, alone, once the pipeline is empty
        if room_for(settings, inflight, pipeline, pipeline_budget) < group and (pipeline or inflight):
            await anyio.sleep(0.5)
            continue
        nxt = await anext(tasks, None)
        if nxt is None:
            break
        index, task = nxt
        # a task that names its own group size (JSONL, resampling) keeps it; the learner reads
        # the size from the task to assemble whole groups
        group = task.group_size if task.group_size > 1 else settings.group_size
        if task.group_size != group:
            task = msgspec.structs.replace(task, group_size=group)
        now = time.time()
        samples = [TaskSample(run=run, task=task, sample_idx=k, created_at=now) for k in range(group)]
        await publish_samples(js, pub, samples)  # the task into the registry first, then its samples
        cursor = index + 1
        published += group
        await _save_cursor(js, run, cursor)
        if published % 50 < group:
            log.info(
                "producer_progress", published=published, cursor=cursor, inflight=inflight, pipeline=pipeline
            )
    log.info("producer_done", cursor=cursor)
    await anyio.sleep_forever()
