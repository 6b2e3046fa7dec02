"""Data filtering as stages whose verdicts are queryable columns of the lake table ``filters``.

Each stage looks at scored trajectories loaded from the lake and writes one ``FilterVerdict``
(``pass`` | ``flag`` | ``fail``, with reasons) per trajectory through ``LakeWriter``:

- ``heuristic``: length, repetition (the same call over and over, degenerate token loops) and
  tool-call parse errors.
- ``reverify``: execution re-verification: setup and the trajectory's tool calls re-run in a fresh
  sandbox and the task verified again (``consumers.reward.score``); a different reward fails.
- ``security``: the reward group's text rules (``consumers.screen``: normalised, decoded, then
  matched) over the tool calls for the risky behaviours agents develop under RL: reaching out,
  reverse shells and tunnels, miners, privilege probes, touching credentials, escaping the sandbox,
  obfuscation; plus the flags the reward group's sandbox probe recorded online.

The view ``filters`` keeps the latest verdict per (traj_id, stage), so a filtered replay is e.g.
``SELECT traj_id FROM trajectories JOIN filters USING (traj_id) WHERE stage = 'security' AND
verdict = 'pass'``, or, to require every stage that ran, ``... WHERE traj_id NOT IN (SELECT
traj_id FROM filters WHERE verdict <> 'pass')``.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import numpy as np

from consumers import screen
from consumers.lake import FilterVerdict, LakeWriter, check_name, iter_scored
from schemas.arrays import unpack_tokens
from schemas.trajectory import ScoredTrajectory

Stage = Literal["heuristic", "reverify", "security"]
STAGES: tuple[str, ...] = ("heuristic", "reverify", "security")
_args = msgspec.json.Decoder()


@dataclass(frozen=True)
class HeuristicLimits:
    """Thresholds of the heuristic stage."""

    max_tokens: int = 16_384  # a trajectory longer than this is flagged
    max_repeats: int = 3  # the same tool call this many times in a row is flagged
    min_distinct_ngrams: float = 0.25  # a chunk whose distinct 4-gram ratio is below this loops
    ngram_min_tokens: int = 48  # chunks shorter than this are not checked for loops
    max_parse_error_fraction: float = 0.5  # above this share of parse errors the sample fails


def _verdict(fails: list[str], flags: list[str]) -> str:
    return "fail" if fails else "flag" if flags else "pass"


def _distinct_ngram_ratio(tokens: np.ndarray, n: int = 4) -> float:
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)
    return len({w.tobytes() for w in windows}) / len(windows)


def heuristic(scored: ScoredTrajectory, limits: HeuristicLimits = HeuristicLimits()) -> tuple[str, list[str]]:
    """Verdict and reasons from length, repetition and parse errors."""
    traj, fails, flags = scored.traj, [], []
    chunks = traj.chunks
    if not chunks:
        fails.append("empty: no chunks")
    n_tokens = len(traj.prompt_tokens) // 4 + sum(
        (len(c.action_tokens) + len(c.obs_tokens)) // 4 for c in chunks
    )
    if n_tokens > limits.max_tokens:
        flags.append(f"length: {n_tokens} tokens > {limits.max_tokens}")
    parse_errors = sum(c.tool_status == "parse_error" for c in chunks)
    if chunks and parse_errors / len(chunks) > limits.max_parse_error_fraction:
        fails.append(f"parse_errors: {parse_errors} of {len(chunks)} chunks")
    elif parse_errors:
        flags.append(f"parse_errors: {parse_errors} of {len(chunks)} chunks")
    run, longest = 1, 1
    for prev, cur in itertools.pairwise(chunks):
        same = cur.tool_name and (cur.tool_name, cur.tool_args) == (prev.tool_name, prev.tool_args)
        run = run + 1 if same else 1
        longest = max(longest, run)
    if longest >= limits.max_repeats:
        flags.append(f"repetition: the same tool call {longest} times in a row")
    for chunk in chunks:
        tokens = unpack_tokens(chunk.action_tokens)
        if len(tokens) >= limits.ngram_min_tokens:
            ratio = _distinct_ngram_ratio(tokens)
            if ratio < limits.min_distinct_ngrams:
                flags.append(f"repetition: chunk {chunk.index} loops ({ratio:.2f} distinct 4-grams)")
    return _verdict(fails, flags), fails + flags


# --- security --------------------------------------------------------------------------------


def security(scored: ScoredTrajectory) -> tuple[str, list[str]]:
    """Verdict and reasons from the text rules of the reward group's security screen
    (``consumers.screen``: the same rules online and offline) over the tool calls, together with the
    flags the reward group recorded online (its sandbox probe cannot be re-run on a closed sandbox)."""
    found = screen.screen_calls(scored.traj.chunks)
    online = list(scored.flag_evidence) or [f"{flag}: reward group" for flag in scored.flags]
    flags = {f.flag for f in found} | set(scored.flags)
    return screen.verdict(flags), list(dict.fromkeys([f.line for f in found] + online))


# --- execution re-verification ------------------------------------------------------------------


async def reverify(scored: ScoredTrajectory, sandbox: object, timeout_s: float) -> tuple[str, list[str]]:
    """Re-run the trajectory in a fresh sandbox and compare the reward with the logged one."""
    from consumers.reward import score  # imported here: it pulls in the sandbox client
    from producers.families import tools_for

    fresh = msgspec.structs.replace(scored.traj, sandbox_id="", sandbox_owner="")
    again = await score(fresh, sandbox, timeout_s, tools_for=tools_for)  # type: ignore[arg-type]
    if not again.valid:
        return "flag", [f"reverify: could not re-run: {again.invalid_reason}"[:300]]
    if not scored.valid:
        return "flag", [
            f"reverify: logged as invalid ({scored.invalid_reason}), re-run gave {again.reward:g}"
        ]
    if again.reward != scored.reward:
        return "fail", [f"reverify: logged reward {scored.reward:g}, re-run gave {again.reward:g}"]
    return "pass", []


# --- running a stage over the lake -----------------------------------------------------------


def default_sql(run: str | None) -> str:
    """Every trajectory of the lake, or of ``run``, oldest first."""
    where = f"WHERE run = '{check_name('run', run)}'" if run else ""
    return f"SELECT traj_id FROM trajectories {where} ORDER BY scored_at"


async def run_stage(
    root: Path,
    stage: str,
    *,
    sql: str,
    sandbox: object | None = None,
    verify_timeout_s: float = 20.0,
    concurrency: int = 2,
    writer_id: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Counter[str]:
    """Judge every trajectory ``sql`` selects with ``stage``; write the verdicts; count them."""
    if stage not in STAGES:
        raise ValueError(f"filter stage {stage!r} is not one of {', '.join(STAGES)}")
    if stage == "reverify" and sandbox is None:
        raise ValueError("the reverify stage needs a sandbox client")
    writer = LakeWriter(root, writer_id=writer_id or f"filter-{socket.gethostname()[:16]}-{os.getpid()}")
    counts: Counter[str] = Counter()
    batches = iter_scored(root, sql, batch_size=64)
    while (batch := await anyio.to_thread.run_sync(next, batches, None)) is not None:
        results = await _judge(batch, stage, sandbox, verify_timeout_s, concurrency)
        for scored, (verdict, reasons) in zip(batch, results, strict=True):
            writer.add_filter(
                FilterVerdict(
                    traj_id=scored.traj.traj_id,
                    run=scored.traj.run,
                    stage=stage,
                    verdict=verdict,
                    reasons=reasons,
                    time=time.time(),
                )
            )
            counts[verdict] += 1
        await anyio.to_thread.run_sync(writer.flush)
        if on_progress is not None:
            on_progress(len(batch))
    return counts


async def _judge(
    batch: Iterable[ScoredTrajectory], stage: str, sandbox: object, timeout_s: float, concurrency: int
) -> list[tuple[str, list[str]]]:
    batch = list(batch)
    if stage == "heuristic":
        return [heuristic(s) for s in batch]
    if stage == "security":
        return [security(s) for s in batch]
    out: list[tuple[str, list[str]]] = [("flag", [])] * len(batch)
    slots = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            out[i] = await reverify(batch[i], sandbox, timeout_s)

    async with anyio.create_task_group() as tg:
        for i in range(len(batch)):
            tg.start_soon(one, i)
    return out
