"""The replay producer: trajectories chosen by SQL over the lake, re-published to the learner.

Each selected trajectory is loaded back in full (``consumers.lake.iter_scored``) and
published to ``rs.traj.scored.<run>`` as ``ScoredTrajectory(replay=True, replay_mode=mode)``. The
learner trains replay samples with SFT (``mode="sft"``) or with IPA under truncated importance
sampling against their logged behaviour log-probabilities (``mode="ipa"``); they are governed by
that truncation, not by the on-policy staleness bound, and marked ``source="replay"`` in the train
log. Message ids are ``replay:<traj_id>:<nonce>`` with one nonce per replay, so a second replay of
the same trajectory is a new message (not deduplicated away) while a retried publish within one
replay is stored once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext

from consumers.lake import iter_scored
from schemas.trajectory import ScoredTrajectory
from streams.bus import Publisher
from streams.topology import subject

log = structlog.get_logger(__name__)
ReplayMode = Literal["sft", "ipa"]
MODES: tuple[str, ...] = ("sft", "ipa")


def as_replay(scored: ScoredTrajectory, mode: ReplayMode) -> ScoredTrajectory:
    """The replay copy of a lake trajectory: same record, marked ``replay`` with its mode."""
    return msgspec.structs.replace(scored, replay=True, replay_mode=mode)


def replay_msg_id(traj_id: str, nonce: str) -> str:
    return f"replay:{traj_id}:{nonce}"


async def replay(
    js: JetStreamContext,
    root: Path,
    sql: str,
    *,
    run: str,
    mode: ReplayMode,
    batch_size: int = 64,
    nonce: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Publish every trajectory ``sql`` selects as a replay sample of ``run``; returns how many.

    Loading blocks (DuckDB), so each batch is read in a worker thread; publishing is async with a
    bounded number of acks in flight, and every ack is awaited before returning.
    """
    if mode not in MODES:
        raise ValueError(f"replay mode {mode!r} is not one of {', '.join(MODES)}")
    nonce = nonce or secrets.token_hex(6)
    target = subject("scored", run)
    batches: Iterator[list[ScoredTrajectory]] = iter_scored(root, sql, batch_size=batch_size)
    pub = Publisher(js, max_inflight=256)
    sent = 0
    try:
        while (batch := await anyio.to_thread.run_sync(next, batches, None)) is not None:
            for scored in batch:
                msg_id = replay_msg_id(scored.traj.traj_id, nonce)
                await pub.publish_async(target, as_replay(scored, mode), msg_id=msg_id)
            await pub.flush()
            sent += len(batch)
            if on_progress is not None:
                on_progress(len(batch))
    finally:
        await anyio.to_thread.run_sync(_close, batches)
    log.info("replay_published", run=run, mode=mode, trajectories=sent, nonce=nonce)
    return sent


def _close(batches: Iterator[list[ScoredTrajectory]]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()
