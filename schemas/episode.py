"""An episode in flight: its chunks as they are made (``rs.traj.chunks.<run>.<episode key>``) and
the handle of its sandbox (KV ``rs_episodes``).

rollout -> lake (``chunks_live``) and rollout -> rollout (a redelivered task resumes the episode
from its last durable chunk). ``EpisodeSandbox`` carries the sandbox's capability token, so it
lives only in the ``rs_episodes`` bucket, which only the rollout role can read; it never reaches
the lake.
"""

from __future__ import annotations

import msgspec

from schemas.trajectory import Chunk, TrajStatus


class ChunkRecord(msgspec.Struct, frozen=True, kw_only=True, tag="chunk_rec.v1", tag_field="kind"):
    """One chunk of an episode, published when its tool call returned (msg id ``chunk:<traj>:<i>``).

    ``prompt_tokens`` travels with chunk 0 only (the prompt of a resumed episode is the recorded
    one, token for token). ``final`` is the episode's status when this chunk ended it, else "".
    """

    traj_id: str
    run: str
    task_id: str
    sample_idx: int
    chunk: Chunk
    prompt_tokens: bytes = b""  # int32 LE, chunk 0 only
    final: TrajStatus | None = None
    abort_reason: str = ""
    sandbox_id: str = ""
    sandbox_owner: str = ""
    started_at: float = 0.0
    attempt: int = 1  # the task's delivery that made this chunk (1: the first)
    resumed: int = 0  # times the episode had been resumed when this chunk was made
    time: float = 0.0


class EpisodeSandbox(msgspec.Struct, frozen=True, kw_only=True, tag="episode_sbx.v1", tag_field="kind"):
    """Where an episode in flight acts: the sandbox, its owner instance and capability token."""

    traj_id: str
    sandbox_id: str
    owner: str
    token: str  # secret: rs_episodes only
    resumed: int = 0
