"""One proxy session's recording: its model calls as the chunks of one trajectory.

A call's generation is held as a *candidate* (``n`` of them when the client asked for ``n``
choices) until the next call shows what the client did with it: the next request's tokens extend
one candidate's ``fed + generated`` tokens, so that candidate becomes a chunk whose observation is
the new tokens in between. A request that extends none of them edited the history (context
compaction, dropped or rewritten messages): the last candidate is committed without observation
and the new call starts a new **segment** of the same trajectory, its chunk carrying the whole
context it was generated under in ``Chunk.context_tokens``. The trajectory's rows (``prompt +
Σ(action + obs)`` per segment) are thus exactly what the engine saw, one episode stays one
trajectory, and every generated token is in exactly one chunk with its behaviour log-probability.
Choices the client did not continue with are counted (``dropped_choices``), not recorded: the
episode's reward says nothing about them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from schemas.arrays import pack_logprobs, pack_tokens
from schemas.task import Task
from schemas.trajectory import Chunk, ToolStatus, Trajectory, TrajStatus


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a session's trajectory is: set by the agent runner for an episode, else made up."""

    traj_id: str
    run: str
    task_id: str
    family: str
    group_id: str
    sample_idx: int = 0
    task: Task | None = None


@dataclass(slots=True)
class Candidate:
    """One generated choice, not yet known to be continued by the client."""

    fed: list[int]
    tokens: list[int]
    logprobs: list[float]
    version: int
    gen_ms: float
    tool_name: str = ""
    tool_args: str = ""
    tool_status: ToolStatus = "none"
    text_key: str = ""  # legacy completions: the prompt text plus the returned text, when exact


@dataclass
class Session:
    """A conversation being recorded (see the module docstring)."""

    session_id: str
    identity: Identity
    prompt: list[int] | None = None
    chunks: list[Chunk] = field(default_factory=list)
    pending: list[Candidate] = field(default_factory=list)
    generated: dict[str, list[int]] = field(default_factory=dict)
    new_context: list[int] | None = None  # the context of the next chunk when it starts a segment
    segments: int = 0
    dropped_choices: int = 0
    calls: int = 0
    started_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Set by the agent runner, which owns the session (the idle reaper leaves it alone): a shell
    # command runner into the episode's sandbox and the token a caller must show to use it.
    managed: bool = False
    exec_token: str = ""
    exec_handler: Any = None
    tokenizer: Any = None  # to decode observation text

    def observe(self, fed: list[int]) -> None:
        """Before a call fed ``fed``: commit the candidate it continues, or start a new segment."""
        self.last_seen = time.monotonic()
        if self.prompt is None:
            self.prompt = list(fed)
            self.segments = 1
            return
        for cand in self.pending:
            seen = cand.fed + cand.tokens
            if fed[: len(seen)] == seen:
                self._commit(cand, fed[len(seen) :])
                return
        self._commit(self.pending[0] if self.pending else None, [])
        self.new_context = list(fed)
        self.segments += 1

    def add(self, candidates: list[Candidate]) -> None:
        """The choices of the call just made."""
        self.pending = candidates
        self.calls += 1

    def close(self) -> None:
        """Commit what the client never answered (the first choice, with no observation)."""
        self._commit(self.pending[0] if self.pending else None, [])

    def _commit(self, cand: Candidate | None, obs: list[int]) -> None:
        if cand is None:
            return
        self.dropped_choices += len(self.pending) - 1
        self.pending = []
        context = self.new_context if self.new_context is not None and self.new_context == cand.fed else None
        self.new_context = None
        self.chunks.append(
            Chunk(
                index=len(self.chunks),
                action_tokens=pack_tokens(cand.tokens),
                action_logprobs=pack_logprobs(cand.logprobs),
                policy_version=cand.version,
                tool_name=cand.tool_name,
                tool_args=cand.tool_args,
                tool_status=cand.tool_status,
                obs_tokens=pack_tokens(obs),
                obs_text=self.tokenizer.decode(obs, skip_special_tokens=False) if obs else "",
                gen_ms=cand.gen_ms,
                context_tokens=pack_tokens(context) if context else b"",
            )
        )

    def trajectory(self, *, status: TrajStatus | None = None, reason: str = "") -> Trajectory:
        """The recording as one trajectory (call ``close`` first to include the last call)."""
        versions = [c.policy_version for c in self.chunks] or [0]
        if status is None:
            ended_on_answer = bool(self.chunks) and self.chunks[-1].tool_status == "none"
            status = "completed" if ended_on_answer and not reason else "truncated"
        ident = self.identity
        return Trajectory(
            traj_id=ident.traj_id,
            run=ident.run,
            task_id=ident.task_id,
            family=ident.family,
            group_id=ident.group_id,
            sample_idx=ident.sample_idx,
            prompt_tokens=pack_tokens(self.prompt or []),
            chunks=list(self.chunks),
            status=status,
            min_version=min(versions),
            max_version=max(versions),
            abort_reason=reason,
            started_at=self.started_at,
            finished_at=time.time(),
            source="proxy",
            task=ident.task,
        )
