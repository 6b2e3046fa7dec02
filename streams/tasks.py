"""The task registry: KV ``rs_tasks``, the producer's own record of every task it published.

The reward group must verify a trajectory with the task *as the producer published it*: the copy a
raw trajectory carries (``Trajectory.task``) is written by the rollout side, which anyone holding
the rollout role's credentials can forge (``verify = ["true"]``). So whoever publishes task samples
first writes each task here (key ``<run>.<sha256 of task id>``, see ``streams.topology.task_key``)
and only then the samples; the reward group looks the task up by the trajectory's ``task_id`` in its
own run. The broker lets only producing roles write the bucket (``ops.security``).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext

from schemas.codec import encode, task_decoder
from schemas.task import Task, TaskSample
from streams.bus import Publisher
from streams.kv import kv_get, kv_put
from streams.topology import TASKS_BUCKET, subject, task_key


class RegistryCorrupt(ValueError):
    """A registry entry that does not decode as a task (never scored from: the sample is invalid)."""


async def register(js: JetStreamContext, run: str, task: Task) -> None:
    """Record ``task`` as run ``run``'s authoritative copy (idempotent; a newer copy replaces it)."""
    key, data = task_key(run, task.task_id), encode(task)

    await kv_put(js, TASKS_BUCKET, key, data)


async def lookup(js: JetStreamContext, run: str, task_id: str) -> Task | None:
    """The task the producer published under ``task_id`` in ``run``, or None if it never did (or
    the entry expired). Raises ``RegistryCorrupt`` for an entry that is not a task."""
    key = task_key(run, task_id)

    value = await kv_get(js, TASKS_BUCKET, key)
    if value is None:
        return None
    try:
        task = task_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise RegistryCorrupt(f"registry entry {key} is not a task: {exc}") from exc
    if task.task_id != task_id:  # a hash collision, or an entry written under the wrong key
        raise RegistryCorrupt(f"registry entry {key} holds task {task.task_id!r}, not {task_id!r}")
    return task


async def publish_samples(js: JetStreamContext, pub: Publisher, samples: Iterable[TaskSample]) -> int:
    """Register every distinct task of ``samples`` (each in its sample's run), then publish the
    samples to ``rs.tasks.<run>``; returns how many were published. Registration comes first, so a
    trajectory of a published sample always finds its task."""
    samples = list(samples)
    seen: set[tuple[str, str]] = set()
    for s in samples:
        if (s.run, s.task.task_id) not in seen:
            seen.add((s.run, s.task.task_id))
            await register(js, s.run, s.task)
    for s in samples:
        await pub.publish_async(subject("tasks", s.run), s, msg_id=s.msg_id)
    await pub.flush()
    return len(samples)
