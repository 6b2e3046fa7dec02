"""The task producer: feeds ``rs.tasks.<run>`` while bounding in-flight work.

In-flight = samples waiting for or held by the rollout group (the consumer's pending plus
ack-pending counts). Keeping it small keeps rollouts close to the learner's version, so few samples
are dropped as stale. The producer's position is kept in KV so a restart does not repeat tasks.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from producers.builtin import FAMILY, make_task
from producers.jsonl import load_jsonl
from schemas.task import Task, TaskSample
from streams.bus import Publisher, backlog
from streams.topology import POLICY_BUCKET, ROLLOUT, check_run, subject

log = structlog.get_logger(__name__)


def builtin_task_at(seed: int, index: int, levels: tuple[int, ...]) -> Task:
    """Task number ``index`` of the endless built-in stream (deterministic in seed and index)."""
    level = levels[index % len(levels)]
    rng = random.Random(f"{FAMILY}:{seed}:{index}")
    return make_task(level, rng, f"{FAMILY}-s{seed}-{index:06d}-L{level}")


async def task_stream(cfg: Any, start: int, nc: NATS | None = None) -> AsyncIterator[tuple[int, Task]]:
    """(index, task) pairs from the configured source, starting at ``start``."""
    source = cfg.producer.source
    if source == "jsonl":
        tasks = load_jsonl(Path(cfg.producer.path))
        for i in range(start, len(tasks)):
            yield i, tasks[i]
        return
    if source == "gem":
        # GEM tasks read their first observation in a sandbox, so they come in small batches.
        from producers.gem_tasks import gem_tasks
        from sandboxd.client import SandboxClient

        if nc is None:
            raise ValueError("producer.source = gem needs a broker connection for its sandbox")
        client = SandboxClient(nc)
        i = start
        while True:
            batch = await gem_tasks(client, cfg.producer.env_id, seed=cfg.producer.seed, count=8, start=i)
            for task in batch:
                yield i, task
                i += 1
    i = start
    while True:
        yield i, builtin_task_at(cfg.producer.seed, i, tuple(cfg.producer.levels))
        i += 1


async def _load_cursor(js: JetStreamContext, run: str) -> int:
    kv = await js.key_value(POLICY_BUCKET)
    try:
        entry = await kv.get(f"{check_run(run)}.producer_cursor")
    except (KeyNotFoundError, NotFoundError):
        return 0
    return int(entry.value or b"0")


async def _save_cursor(js: JetStreamContext, run: str, cursor: int) -> None:
    kv = await js.key_value(POLICY_BUCKET)
    await kv.put(f"{check_run(run)}.producer_cursor", str(cursor).encode())


async def run(
    cfg: Any,
    js: JetStreamContext,
    nc: NATS | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Publish task samples, at most ``producer.max_inflight`` outstanding, until cancelled or done."""
    pub = Publisher(js)
    cursor = await _load_cursor(js, cfg.run)
    tasks = task_stream(cfg, cursor, nc)
    group = cfg.producer.group_size
    task_status.started()
    log.info(
        "producer_started", cursor=cursor, source=cfg.producer.source, max_inflight=cfg.producer.max_inflight
    )
    published = 0
    while cfg.producer.total == 0 or cursor < cfg.producer.total:
        pending, ack_pending, _ = await backlog(js, ROLLOUT, cfg.run)
        room = cfg.producer.max_inflight - (pending + ack_pending)
        if room < group:
            await anyio.sleep(0.5)
            continue
        nxt = await anext(tasks, None)
        if nxt is None:
            break
        index, task = nxt
        # a task that names its own group size (JSONL, resampling) keeps it; the learner reads
        # the size from the task to assemble whole groups
        group = task.group_size if task.group_size > 1 else cfg.producer.group_size
        if task.group_size != group:
            task = msgspec.structs.replace(task, group_size=group)
        for k in range(group):
            sample = TaskSample(run=cfg.run, task=task, sample_idx=k, created_at=time.time())
            await pub.publish(subject("tasks", cfg.run), sample, msg_id=sample.msg_id)
        cursor = index + 1
        published += group
        await _save_cursor(js, cfg.run, cursor)
        if published % 50 < group:
            log.info("producer_progress", published=published, cursor=cursor, inflight=pending + ack_pending)
    log.info("producer_done", cursor=cursor)
    await anyio.sleep_forever()
