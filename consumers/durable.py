"""Durable episodes: chunks published as they are made, sandboxes held by an owner lease, and a
redelivered task's episode resumed from its last durable chunk (docs/architecture.md, "Durable
episodes").

- ``EpisodeJournal`` (one per episode, the loop's ``Journal``) publishes every chunk on
  ``rs.traj.chunks.<run>.<episode key>`` once its tool call returned (msg id
  ``chunk:<traj>:<index>``), and records the episode's sandbox and capability token in KV
  ``rs_episodes`` (rollout role only), so that whichever worker gets the task next can reattach.
- ``Leases`` (one per worker) keeps the sandboxes of its episodes alive: they are created with a
  short TTL (the lease) and get a keepalive every heartbeat, so a dead worker's sandboxes close
  within seconds of its lease lapsing, not at the 900 s TTL. A finished episode's sandbox is handed
  over to the verifier with the full TTL. Keepalives carry the sandbox's capability token: nobody
  without it (the agent least of all) can extend or end another episode's lease.
- ``load_resume`` reads what an earlier delivery left: the recorded chunks (contiguous from 0) and
  the sandbox, if it is alive (a keepalive with its token succeeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from agent_harness.loop import Resume
from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError
from schemas.arrays import pack_tokens, unpack_tokens
from schemas.codec import chunk_record_decoder, encode, episode_sandbox_decoder
from schemas.episode import ChunkRecord, EpisodeSandbox
from schemas.sandbox import Created
from schemas.task import TaskSample
from schemas.trajectory import Chunk, TrajStatus
from streams.bus import Publisher
from streams.kv import kv_delete, kv_get, kv_put
from streams.topology import EPISODES_BUCKET, TRAJ, chunk_subject, episode_kv_key

log = structlog.get_logger(__name__)
LEASES_PER_HEARTBEAT = 3.0  # a lease outlives the ack wait (2 heartbeats) by one heartbeat


def lease_for(heartbeat_s: float) -> float:
    """How long an episode's sandbox outlives its owner's last keepalive: past the task's ack wait,
    so that the worker the task is redelivered to can still reattach."""
    return LEASES_PER_HEARTBEAT * heartbeat_s


class Leases:
    """The owner lease of one rollout worker's sandboxes (a keepalive per sandbox and heartbeat)."""

    def __init__(self, sandbox: SandboxClient, *, lease_s: float, every_s: float) -> None:
        self.sandbox, self.lease_s, self.every_s = sandbox, lease_s, every_s
        self.held: set[str] = set()
        self.failures = 0
        # A renewal and a hand-over of one sandbox must not cross (the lease would win over the TTL).
        self._lock = anyio.Lock()

    def hold(self, sandbox_id: str) -> None:
        self.held.add(sandbox_id)

    async def renew(self, sandbox_id: str) -> bool:
        """Extend one lease now; False if the sandbox is gone (or refuses the token)."""
        try:
            with anyio.fail_after(max(self.every_s, 1.0)):
                await self.sandbox.keepalive(sandbox_id, self.lease_s)
        except (SandboxError, TimeoutError) as exc:
            self.failures += 1
            log.info("lease_renew_failed", sandbox_id=sandbox_id, error=str(exc))
            return False
        return True

    async def hand_over(self, sandbox_id: str, ttl_s: float) -> None:
        """The episode is over: its sandbox waits for the verifier with the full TTL, unleased."""
        async with self._lock:
            self.held.discard(sandbox_id)
            if not sandbox_id:
                return
            try:
                await self.sandbox.keepalive(sandbox_id, ttl_s)
            except SandboxError as exc:  # gone: the reward group replays into a fresh one
                log.info("lease_hand_over_failed", sandbox_id=sandbox_id, error=str(exc))

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.every_s)
            for sandbox_id in list(self.held):
                async with self._lock:
                    if sandbox_id in self.held and not await self.renew(sandbox_id):
                        self.held.discard(sandbox_id)


@dataclass
class EpisodeJournal:
    """Makes one episode durable as it goes (``agent_harness.loop.Journal``)."""

    js: JetStreamContext
    pub: Publisher
    leases: Leases
    sample: TaskSample
    attempt: int = 1
    resumed: int = 0
    started_at: float = field(default_factory=time.time)
    sandbox_id: str = ""
    sandbox_owner: str = ""
    chunks_published: int = 0

    @property
    def lease_s(self) -> float:
        return self.leases.lease_s

    async def sandbox_created(self, created: Created) -> None:
        self.sandbox_id, self.sandbox_owner = created.sandbox_id, created.owner
        self.leases.hold(created.sandbox_id)
        entry = EpisodeSandbox(
            traj_id=self.sample.msg_id,
            sandbox_id=created.sandbox_id,
            owner=created.owner,
            token=created.token,
            resumed=self.resumed,
        )
        await kv_put(
            self.js, EPISODES_BUCKET, episode_kv_key(self.sample.run, self.sample.msg_id), encode(entry)
        )

    async def chunk_made(
        self, chunk: Chunk, *, prompt: list[int], final: TrajStatus | None, abort_reason: str
    ) -> None:
        record = ChunkRecord(
            traj_id=self.sample.msg_id,
            run=self.sample.run,
            task_id=self.sample.task.task_id,
            sample_idx=self.sample.sample_idx,
            chunk=chunk,
            prompt_tokens=pack_tokens(prompt) if prompt else b"",
            final=final,
            abort_reason=abort_reason,
            sandbox_id=self.sandbox_id,
            sandbox_owner=self.sandbox_owner,
            started_at=self.started_at,
            attempt=self.attempt,
            resumed=self.resumed,
            time=time.time(),
        )
        subject = chunk_subject(self.sample.run, self.sample.msg_id)
        await self.pub.publish(subject, record, msg_id=f"chunk:{self.sample.msg_id}:{chunk.index}")
        self.chunks_published += 1

    async def forget(self) -> None:
        """The episode's trajectory is published: its sandbox entry (and token) can go."""
        await kv_delete(self.js, EPISODES_BUCKET, episode_kv_key(self.sample.run, self.sample.msg_id))


async def read_chunks(js: JetStreamContext, run: str, traj_id: str) -> list[ChunkRecord]:
    """The recorded chunks of an episode, contiguous from index 0 (first copy of each index)."""
    subject, seq = chunk_subject(run, traj_id), 1
    by_index: dict[int, ChunkRecord] = {}
    while True:
        try:
            msg = await js.get_msg(TRAJ.name, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        try:
            record = chunk_record_decoder.decode(msg.data or b"")
        except msgspec.DecodeError as exc:  # not ours to fix here: resume from what decodes
            log.warning("chunk_record_undecodable", seq=msg.seq, error=str(exc))
        else:
            by_index.setdefault(record.chunk.index, record)
        seq = int(msg.seq or seq) + 1
    chunks: list[ChunkRecord] = []
    while len(chunks) in by_index:
        chunks.append(by_index[len(chunks)])
    return chunks


async def load_resume(
    js: JetStreamContext, sandbox: SandboxClient, leases: Leases, sample: TaskSample
) -> Resume | None:
    """What an earlier delivery of ``sample`` left, as a ``Resume`` (None: start afresh). The live
    sandbox the chunks were made in is reattached (its lease renewed and held); any other is closed."""
    records = await read_chunks(js, sample.run, sample.msg_id)
    entry = await _kv_get(js, episode_kv_key(sample.run, sample.msg_id))
    if entry is not None:
        sandbox.adopt(entry.sandbox_id, entry.token)
    if not records or not records[0].prompt_tokens:
        if entry is not None:  # a sandbox with no durable chunk: its state is unknown, start afresh
            await sandbox.close(entry.sandbox_id)
        return None
    last = records[-1]
    alive = False
    if entry is not None and entry.sandbox_id == last.sandbox_id and last.final is None:
        alive = await leases.renew(entry.sandbox_id)
        if alive:
            leases.hold(entry.sandbox_id)
        else:
            await sandbox.close(entry.sandbox_id)
    resumed = max(last.resumed, entry.resumed if entry else 0) + 1
    return Resume(
        prompt=unpack_tokens(records[0].prompt_tokens).tolist(),
        chunks=[r.chunk for r in records],
        sandbox_id=last.sandbox_id if alive or last.final is not None else "",
        sandbox_owner=last.sandbox_owner if alive or last.final is not None else "",
        final=last.final,
        abort_reason=last.abort_reason,
        started_at=records[0].started_at,
        resumed=resumed,
    )


async def _kv_get(js: JetStreamContext, key: str) -> EpisodeSandbox | None:
    value = await kv_get(js, EPISODES_BUCKET, key)
    if not value:
        return None
    try:
        return episode_sandbox_decoder.decode(value)
    except msgspec.DecodeError as exc:
        log.warning("episode_entry_undecodable", key=key, error=str(exc))
        return None
