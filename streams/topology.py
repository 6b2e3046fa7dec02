"""JetStream topology as data: streams, per-run durable consumers, the KV buckets, the object store.

``ensure()`` is the only code in rollstream that creates streams or consumers; it is idempotent
(running it twice, or from several processes at once, changes nothing).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

RUN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
POLICY_BUCKET = "rs_policy"
TASKS_BUCKET = "rs_tasks"
EPISODES_BUCKET = "rs_episodes"
WEIGHTS_BUCKET = "rs_weights"
MAX_MSG_BYTES = 8 * 1024 * 1024


class TopologyError(ValueError):
    """A run name or topology setting that JetStream cannot accept."""


def check_run(run: str) -> str:
    if not RUN_RE.match(run):
        raise TopologyError(
            f"run name {run!r} is invalid: use 1-64 letters, digits, '-' or '_' "
            "(it becomes part of subjects)."
        )
    return run


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * 24 * 3600
    duplicate_window_s: float = 600.0


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer shared by every process of one group, per run."""

    group: str
    stream: str
    subject_template: str  # formatted with run=
    ack_wait_s: float = 60.0
    max_deliver: int = 5
    max_ack_pending: int = 256

    def durable(self, run: str) -> str:
        return f"{self.group}-{check_run(run)}"

    def subject(self, run: str) -> str:
        return self.subject_template.format(run=check_run(run))


TASKS = StreamSpec("RS_TASKS", ("rs.tasks.>",))
TRAJ = StreamSpec("RS_TRAJ", ("rs.traj.>",))
TRAIN = StreamSpec("RS_TRAIN", ("rs.train.>",))
DLQ = StreamSpec("RS_DLQ", ("rs.dlq.>",), duplicate_window_s=0.0)
STREAMS: tuple[StreamSpec, ...] = (TASKS, TRAJ, TRAIN, DLQ)

# Episodes take minutes: rollout and reward heartbeat with in_progress() well inside ack_wait.
# ``ensure(ack_wait_s=...)`` sets their ack wait from the heartbeat (``ack_wait_for``), so a dead
# worker's message is redelivered within ~2 heartbeats; the values here are for callers that give
# none. Rollout tolerates more deliveries: a killed worker's episode resumes, it is not poison.
ROLLOUT = ConsumerSpec(
    "rollout", TASKS.name, "rs.tasks.{run}", ack_wait_s=120.0, max_deliver=8, max_ack_pending=64
)
REWARD = ConsumerSpec(
    "reward", TRAJ.name, "rs.traj.raw.{run}", ack_wait_s=120.0, max_deliver=5, max_ack_pending=64
)
LEARNER = ConsumerSpec(
    "learner", TRAJ.name, "rs.traj.scored.{run}", ack_wait_s=60.0, max_deliver=5, max_ack_pending=1024
)
LAKE_TASKS = ConsumerSpec("lake-tasks", TASKS.name, "rs.tasks.{run}", ack_wait_s=60.0, max_ack_pending=4096)
LAKE_TRAJ = ConsumerSpec(
    "lake-traj", TRAJ.name, "rs.traj.scored.{run}", ack_wait_s=60.0, max_ack_pending=4096
)
LAKE_TRAIN = ConsumerSpec(
    "lake-train", TRAIN.name, "rs.train.log.{run}", ack_wait_s=60.0, max_ack_pending=4096
)
# Chunks of episodes in flight (rs.traj.chunks.<run>.<episode key>), for the lake's chunks_live.
LAKE_CHUNKS = ConsumerSpec(
    "lake-chunks", TRAJ.name, "rs.traj.chunks.{run}.>", ack_wait_s=60.0, max_ack_pending=4096
)
CONSUMERS: tuple[ConsumerSpec, ...] = (
    ROLLOUT,
    REWARD,
    LEARNER,
    LAKE_TASKS,
    LAKE_TRAJ,
    LAKE_TRAIN,
    LAKE_CHUNKS,
)
HEARTBEATS_PER_ACK_WAIT = 2.0


def ack_wait_for(heartbeat_s: float) -> float:
    """The ack wait of a consumer whose holders heartbeat every ``heartbeat_s``: two heartbeats, so
    a dead holder's message is redelivered within ~2 heartbeats while a live one never loses it."""
    return HEARTBEATS_PER_ACK_WAIT * heartbeat_s


@dataclass(frozen=True)
class KvSpec:
    """A KV bucket. ``direct`` reads go by subject (``$JS.API.DIRECT.GET.<stream>.<key subject>``),
    so read permissions can be granted per key prefix (per run)."""

    bucket: str
    history: int = 1
    ttl_s: float = 0.0  # 0: entries never expire
    max_bytes: int = -1
    max_value_size: int = -1
    direct: bool = False

    @property
    def stream(self) -> str:
        return f"KV_{self.bucket}"


POLICY_KV = KvSpec(POLICY_BUCKET, history=16)
# The task registry (streams.tasks): the producer writes every task here before its first sample,
# and the reward group verifies with this copy, never with the one inside a raw trajectory. Bounded:
# one revision per task, entries live as long as the streams keep messages, 1 GiB in all.
TASKS_KV = KvSpec(
    TASKS_BUCKET,
    history=1,
    ttl_s=TASKS.max_age_s,
    max_bytes=1 << 30,
    max_value_size=1 << 20,
    direct=True,
)
# Episodes in flight (consumers.durable): traj -> its sandbox and capability token, so that the
# worker a redelivered task lands on can reattach. Rollout role only; an entry outlives no episode
# by more than a day.
EPISODES_KV = KvSpec(EPISODES_BUCKET, history=1, ttl_s=24 * 3600, max_value_size=4096, direct=True)
KV_BUCKETS: tuple[KvSpec, ...] = (POLICY_KV, TASKS_KV, EPISODES_KV)


def subject(kind: str, run: str) -> str:
    """The subject for a record kind in a run: tasks, raw, scored, train, or dlq.<stage>."""
    run = check_run(run)
    if kind == "tasks":
        return f"rs.tasks.{run}"
    if kind == "raw":
        return f"rs.traj.raw.{run}"
    if kind == "scored":
        return f"rs.traj.scored.{run}"
    if kind == "train":
        return f"rs.train.log.{run}"
    if kind == "chunks":  # every episode of the run (each has its own subject, ``chunk_subject``)
        return f"rs.traj.chunks.{run}.>"
    if kind.startswith("dlq."):
        return f"rs.dlq.{kind[4:]}.{run}"
    raise TopologyError(f"unknown subject kind {kind!r}")


def episode_key(traj_id: str) -> str:
    """A subject- and key-safe name of an episode (traj ids hold ':' and '.')."""
    return hashlib.sha256(traj_id.encode()).hexdigest()[:40]


def chunk_subject(run: str, traj_id: str) -> str:
    """The subject an episode's chunks are published on as they are made."""
    return f"rs.traj.chunks.{check_run(run)}.{episode_key(traj_id)}"


def episode_kv_key(run: str, traj_id: str) -> str:
    """The ``rs_episodes`` key of an episode in flight."""
    return f"{check_run(run)}.{episode_key(traj_id)}"


def policy_key(run: str) -> str:
    return f"{check_run(run)}.latest"


def task_key(run: str, task_id: str) -> str:
    """The registry key of a task: ``<run>.<sha256 of the task id>`` (task ids may hold characters
    that KV keys forbid; the run prefix lets permissions be granted per run)."""
    return f"{check_run(run)}.{hashlib.sha256(task_id.encode()).hexdigest()[:40]}"


def weights_object(run: str, version: int) -> str:
    return f"{check_run(run)}/v{version:06d}.safetensors"


def _stream_config(spec: StreamSpec, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_msg_size=MAX_MSG_BYTES,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
    )


def consumer_config(spec: ConsumerSpec, run: str, ack_wait_s: float | None = None) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable(run),
        filter_subject=spec.subject(run),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s or spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        max_waiting=512,
    )


def _kv_config(spec: KvSpec, replicas: int) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=spec.bucket,
        history=spec.history,
        ttl=spec.ttl_s or None,
        max_bytes=spec.max_bytes,
        max_value_size=spec.max_value_size,
        direct=spec.direct,
        replicas=replicas,
    )


async def ensure(
    js: JetStreamContext, run: str, *, replicas: int = 1, ack_wait_s: Mapping[str, float] | None = None
) -> None:
    """Create or update every stream, this run's consumers, the KV buckets and the object store.
    ``ack_wait_s`` (group -> seconds) overrides the specs' ack waits (``ack_wait_for``)."""
    waits = dict(ack_wait_s or {})
    check_run(run)
    for spec in STREAMS:
        config = _stream_config(spec, replicas)
        try:
            await js.stream_info(spec.name)
            await js.update_stream(config)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:  # created concurrently by another process
                await js.stream_info(spec.name)
    for cspec in CONSUMERS:
        await js.add_consumer(cspec.stream, consumer_config(cspec, run, waits.get(cspec.group)))
    for kv in KV_BUCKETS:
        try:
            await js.key_value(kv.bucket)
        except Exception:  # noqa: BLE001 - nats-py raises BucketNotFoundError or NotFoundError by version
            await js.create_key_value(_kv_config(kv, replicas))
    try:
        await js.object_store(WEIGHTS_BUCKET)
    except Exception:  # noqa: BLE001
        await js.create_object_store(WEIGHTS_BUCKET, ObjectStoreConfig(replicas=replicas, max_bytes=-1))
