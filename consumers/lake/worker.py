"""The lake worker (``rollstream worker lake``): tasks, scored trajectories, the train log and the
chunks of episodes in flight (``chunks_live``) into Parquet.

Steps, as a checkpoint does: add (buffer) -> flush (temp file, fsync, rename) -> ack. A failed
flush acks nothing, so the broker redelivers and the views hide the duplicates.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from consumers.lake.errors import LakeWriteError
from consumers.lake.metrics import FLUSH_ROWS, FLUSH_SECONDS
from consumers.lake.settings import LakeSettings
from consumers.lake.writer import LakeWriter
from schemas.codec import chunk_record_decoder, scored_decoder, tasks_decoder, train_decoder
from streams.bus import Consumer, Delivery
from streams.metrics import DEAD_LETTERED, IN_FLIGHT, MESSAGES
from streams.topology import LAKE_CHUNKS, LAKE_TASKS, LAKE_TRAIN, LAKE_TRAJ

log = structlog.get_logger(__name__)


async def run(
    settings: LakeSettings,
    js: JetStreamContext,
    *,
    run: str,
    root: Path,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Write run ``run`` into the lake at ``root`` (``settings.path`` resolved by the caller) from
    the three ``lake-*`` consumers until cancelled; flush on the way out."""
    writer = LakeWriter(root, writer_id=f"{socket.gethostname()[:16]}-{os.getpid()}")
    tasks = await Consumer(js, LAKE_TASKS, run, tasks_decoder, stage="lake").bind()
    traj = await Consumer(js, LAKE_TRAJ, run, scored_decoder, stage="lake").bind()
    train = await Consumer(js, LAKE_TRAIN, run, train_decoder, stage="lake").bind()
    live = await Consumer(js, LAKE_CHUNKS, run, chunk_record_decoder, stage="lake").bind()
    unacked: list[Delivery[Any]] = []
    task_status.started()
    log.info("lake_started", root=str(root))

    async def flush() -> None:
        if not unacked:
            return
        started = time.perf_counter()
        rows = await anyio.to_thread.run_sync(writer.flush)
        FLUSH_SECONDS.labels(run=run).observe(time.perf_counter() - started)
        for d in unacked:
            await d.ack()
        for table, n in rows.items():
            FLUSH_ROWS.labels(run=run, table=table).inc(n)
        MESSAGES.labels(worker="lake", run=run).inc(len(unacked))
        log.info("lake_flush", messages=len(unacked), **rows)
        unacked.clear()
        IN_FLIGHT.labels(worker="lake", run=run).set(0)

    async def take(consumer: Consumer[Any], add: Callable[[Any], None]) -> int:
        got, poisoned = 0, consumer.stats.dead_lettered
        for d in await consumer.fetch(min(256, settings.max_batch), timeout_s=0.5):
            try:
                add(d.record)
            except (ValueError, TypeError) as exc:  # a record the lake cannot hold: poison
                await consumer.dead_letter(d.msg, f"lake: {exc}")
                continue
            unacked.append(d)
            got += 1
        # Undecodable messages (dead-lettered inside fetch) and unwritable ones alike.
        DEAD_LETTERED.labels(worker="lake", run=run).inc(consumer.stats.dead_lettered - poisoned)
        IN_FLIGHT.labels(worker="lake", run=run).set(len(unacked))
        return got

    last_flush = time.monotonic()
    try:
        while True:
            got = await take(tasks, writer.add_task)
            got += await take(traj, writer.add_scored)
            got += await take(train, writer.add_train)
            got += await take(live, writer.add_chunk_record)
            due = time.monotonic() - last_flush >= settings.flush_interval_s
            if len(unacked) >= settings.max_batch or (due and unacked):
                try:
                    await flush()
                except LakeWriteError as exc:  # nothing acked; keep the buffers, try again later
                    log.error("lake_flush_failed", table=exc.table, error=str(exc))
                    await anyio.sleep(1.0)
                last_flush = time.monotonic()
            elif not got:
                await anyio.sleep(0.2)
    finally:
        with anyio.move_on_after(30, shield=True):
            await flush()
