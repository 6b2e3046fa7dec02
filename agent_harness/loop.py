"""The agent loop: one episode of one task sample in one sandbox, segmented into chunks.

Token accounting is exact by construction: ``prompt_tokens + Σ (action_tokens + obs_tokens)``
is the sequence the engine was last fed plus what it generated. The observation that follows the
final chunk is never fed to the engine, so the final chunk keeps its ``obs_text`` but no
``obs_tokens``.

Context budget: a long observation keeps its head and tail (``max_observation_tokens``), and is cut
further so that ``min_turn_tokens`` stay free for the next turn within ``max_total_tokens``; the
cut is recorded in the chunk's ``obs_text`` (``[... N tokens, middle cut ...]``). Context already
fed to the engine is never edited: eliding old observations would change the prefix under which
earlier chunks' behaviour log-probabilities were computed, and the learner rebuilds one sequence
per trajectory. So when even a cut observation cannot fit, the episode ends as ``truncated`` with
``abort_reason`` ``context_budget: ...`` (the last observation kept as text, not as tokens).

The loop creates the sandbox but does not close it: the reward worker verifies inside it first.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import msgspec
import structlog

from agent_harness.engine import GenRequest, InferenceEngine
from agent_harness.prompt import ENDOFTEXT, IM_END, encode, observation_tokens, prompt_tokens, truncate_middle
from agent_harness.settings import HarnessSettings
from agent_harness.task_sandbox import create_options, episode_timeout, exec_options
from agent_harness.tools import TOOL_CALL_CLOSE, ParseError, ToolCall, ToolRegistry, parse_tool_call
from sandboxd.errors import SandboxCapacity
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.sandbox import Created, ExecResult
from schemas.task import Task, TaskSample
from schemas.trajectory import Chunk, ToolStatus, Trajectory, TrajSource, TrajStatus

log = structlog.get_logger(__name__)


class SandboxAPI(Protocol):
    """The part of ``sandboxd.client.SandboxClient`` the loop uses."""

    async def create(
        self,
        environment: str = "base",
        *,
        labels: dict[str, str] = ...,
        ttl_s: float = ...,
        image: str = ...,
        cpus: float | None = ...,
        memory_mb: int | None = ...,
        writable_root: bool = ...,
        work_mb: int = ...,
        model_socket: bool = ...,
    ) -> Created: ...

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = ...,
        cwd: str = ...,
        max_output_bytes: int = ...,
    ) -> ExecResult: ...

    async def close(self, sandbox_id: str) -> None: ...


class SandboxFailed(Exception):
    """A sandbox operation failed (the infrastructure, not the policy): the episode is aborted."""


@dataclass
class _Episode:
    seq: list[int]
    chunks: list[Chunk] = field(default_factory=list)
    status: TrajStatus = "truncated"
    abort_reason: str = ""
    sandbox_id: str = ""
    sandbox_owner: str = ""
    exec_opts: dict[str, Any] = field(default_factory=dict)  # the task's cwd, if not /work


async def run_episode(
    sample: TaskSample,
    *,
    engine: InferenceEngine,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    before_turn: Callable[[], Awaitable[None]] | None = None,
    source: TrajSource = "online",
    registry: ToolRegistry | None = None,
) -> Trajectory:
    """Run one episode; sandbox failures give an ``aborted`` trajectory, they never raise."""
    registry = registry or ToolRegistry()
    started = time.time()
    tokenizer = engine.tokenizer
    ep = _Episode(seq=prompt_tokens(tokenizer, sample.task.instruction, registry))
    ep.exec_opts = exec_options(sample.task)
    prompt_len = len(ep.seq)
    with anyio.move_on_after(episode_timeout(sample.task, settings.episode_timeout_s)) as scope:
        try:
            await _start_sandbox(sample, sandbox, settings, ep)
            prompt_len = await _replay_prefix(sample, sandbox, settings, registry, tokenizer, ep)
            await _turns(sample, engine, sandbox, settings, registry, before_turn, ep)
        except SandboxFailed as exc:
            ep.status, ep.abort_reason = "aborted", str(exc)
    if scope.cancelled_caught:
        ep.status, ep.abort_reason = "truncated", "episode_timeout"
    if ep.chunks and ep.chunks[-1].obs_tokens:  # nothing was generated after it
        ep.chunks[-1] = msgspec.structs.replace(ep.chunks[-1], obs_tokens=b"")
    versions = [c.policy_version for c in ep.chunks] or [engine.version]
    traj = Trajectory(
        traj_id=sample.msg_id,
        run=sample.run,
        task_id=sample.task.task_id,
        family=sample.task.family,
        group_id=sample.group_id,
        sample_idx=sample.sample_idx,
        prompt_tokens=pack_tokens(ep.seq[:prompt_len]),
        chunks=ep.chunks,
        status=ep.status,
        min_version=min(versions),
        max_version=max(versions),
        sandbox_id=ep.sandbox_id,
        sandbox_owner=ep.sandbox_owner,
        abort_reason=ep.abort_reason,
        started_at=started,
        finished_at=time.time(),
        source=source,
    )
    log.debug("episode", traj_id=traj.traj_id, status=traj.status, chunks=len(traj.chunks))
    return traj


async def _create_waiting(
    sandbox: SandboxAPI, task: Task, labels: dict[str, str], settings: HarnessSettings, **extra: Any
) -> Created:
    """Create a sandbox; while sandboxd is at capacity (its sandboxes wait for verification), wait
    with backoff up to ``sandbox_wait_s``: back-pressure on the rollout, not an aborted episode."""
    deadline = time.monotonic() + settings.sandbox_wait_s
    pause = 0.1
    while True:
        try:
            return await sandbox.create(
                task.environment, labels=labels, ttl_s=settings.sandbox_ttl_s, **create_options(task), **extra
            )
        except SandboxCapacity as exc:
            if time.monotonic() + pause > deadline:
                raise SandboxFailed(f"create failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise SandboxFailed(f"create failed: {type(exc).__name__}: {exc}") from exc
        await anyio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def _start_sandbox(
    sample: TaskSample, sandbox: SandboxAPI, settings: HarnessSettings, ep: _Episode
) -> None:
    created = await create_sandbox(sample, sandbox, settings)
    ep.sandbox_id, ep.sandbox_owner = created.sandbox_id, created.owner
    await setup_sandbox(sample, sandbox, created.sandbox_id, settings)


async def create_sandbox(
    sample: TaskSample, sandbox: SandboxAPI, settings: HarnessSettings, **extra: Any
) -> Created:
    """The episode's sandbox, labelled with its run and trajectory (waits for a free slot); ``extra``
    create options beyond the task's (``model_socket``)."""
    labels = {"rollstream.run": sample.run, "rollstream.traj": sample.msg_id}
    return await _create_waiting(sandbox, sample.task, labels, settings, **extra)


async def setup_sandbox(
    sample: TaskSample, sandbox: SandboxAPI, sandbox_id: str, settings: HarnessSettings
) -> None:
    """Run the task's setup commands; a failing one raises ``SandboxFailed``."""
    opts = exec_options(sample.task)
    for command in sample.task.setup:
        result = await _exec(sandbox, sandbox_id, command, settings.command_timeout_s, opts)
        if result.exit_code != 0 or result.timed_out:
            raise SandboxFailed(
                f"setup command failed ({result.exit_code}): {command}: {result.stderr[:200]}"
            )


async def _exec(
    sandbox: SandboxAPI, sandbox_id: str, command: str, timeout_s: float, opts: dict[str, Any] | None = None
) -> ExecResult:
    try:
        return await sandbox.exec(sandbox_id, command, timeout_s=timeout_s, **(opts or {}))
    except Exception as exc:
        raise SandboxFailed(f"exec failed: {type(exc).__name__}: {exc}") from exc


async def _replay_prefix(
    sample: TaskSample,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    tokenizer: Any,
    ep: _Episode,
) -> int:
    """Run ``sample.prefix_calls`` (chunk-level resampling) and fold them into the prompt: they
    are context for the policy, not its actions, so they carry no loss."""
    for text in sample.prefix_calls:
        call = parse_tool_call(text)
        _, raw_text, _ = await _act(call, sandbox, settings, registry, ep)
        body, _ = truncate_middle(tokenizer, raw_text, settings.max_observation_tokens)
        ep.seq += encode(tokenizer, text) + observation_tokens(tokenizer, body, action_closed=False)
    return len(ep.seq)


async def _turns(
    sample: TaskSample,
    engine: InferenceEngine,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    before_turn: Callable[[], Awaitable[None]] | None,
    ep: _Episode,
) -> None:
    tok = engine.tokenizer
    closing = {tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)}
    stop_ids = sorted(closing | {tok.convert_tokens_to_ids(TOOL_CALL_CLOSE)})
    for index in range(sample.task.max_turns):
        budget = settings.max_total_tokens - len(ep.seq)
        if budget < 1:
            ep.status, ep.abort_reason = "truncated", _budget_reason(ep, settings)
            return
        if before_turn is not None:
            await before_turn()
        version = engine.version
        request = GenRequest(
            list(ep.seq), min(settings.max_new_tokens_per_turn, budget), settings.temperature, stop_ids
        )
        t0 = time.perf_counter()
        [gen] = await engine.generate([request])
        gen_ms = (time.perf_counter() - t0) * 1000
        ep.seq += gen.tokens
        text = tok.decode(gen.tokens, skip_special_tokens=False)
        call = parse_tool_call(text)
        base: dict[str, Any] = {
            "index": index,
            "action_tokens": pack_tokens(gen.tokens),
            "action_logprobs": pack_logprobs(gen.logprobs),
            "policy_version": gen.version if gen.version is not None else version,
            "gen_ms": gen_ms,
        }
        if isinstance(call, ParseError) and call.kind == "no_tool_call" and gen.finish_reason == "stop":
            ep.chunks.append(Chunk(**base, tool_status="none"))  # a final answer
            ep.status = "completed"
            return
        if isinstance(call, ToolCall):
            base |= {"tool_name": call.name, "tool_args": call.arguments_json}
        t1 = time.perf_counter()
        try:
            status, raw_text, done = await _act(call, sandbox, settings, registry, ep)
        except SandboxFailed as exc:  # keep the action: the sequence stays exact when aborted
            ep.chunks.append(Chunk(**base, tool_status="error", obs_text=str(exc)))
            raise
        closed = bool(gen.tokens) and gen.tokens[-1] in closing
        obs: list[int] = []
        obs_text = raw_text
        if not done:
            obs, obs_text = _fit_observation(tok, raw_text, closed, len(ep.seq), settings)
            if not obs:
                done = True
                ep.abort_reason = _budget_reason(ep, settings)
        ep.chunks.append(
            Chunk(
                **base,
                tool_status=status,
                obs_tokens=pack_tokens(obs),
                obs_text=obs_text,
                tool_ms=(time.perf_counter() - t1) * 1000,
            )
        )
        if done:
            ep.status = "truncated" if ep.abort_reason else "completed"
            return
        ep.seq += obs
    ep.status = "truncated"


def _fit_observation(
    tokenizer: Any, text: str, closed: bool, used: int, settings: HarnessSettings
) -> tuple[list[int], str]:
    """Observation tokens (framing + body cut to head and tail) that leave ``min_turn_tokens``
    free; ``[]`` when not even a short cut body fits."""
    framing = len(observation_tokens(tokenizer, [], action_closed=closed))
    room = settings.max_total_tokens - used - settings.min_turn_tokens - framing
    limit = min(settings.max_observation_tokens, room)
    if limit < _MIN_BODY_TOKENS:
        return [], text
    body, shown = truncate_middle(tokenizer, text, limit)
    if len(body) > limit:  # the cut marker itself did not fit
        return [], text
    return observation_tokens(tokenizer, body, action_closed=closed), shown


_MIN_BODY_TOKENS = 8


def _budget_reason(ep: _Episode, settings: HarnessSettings) -> str:
    return f"context_budget: {len(ep.seq)} of {settings.max_total_tokens} tokens used"


async def _act(
    call: ToolCall | ParseError,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    ep: _Episode,
) -> tuple[ToolStatus, str, bool]:
    """Execute a parsed call; returns its status, the whole observation text, and whether the
    episode ends after it."""
    if isinstance(call, ParseError):
        return "parse_error", f"error: {call.message}", False

    async def run(command: str) -> ExecResult:
        return await _exec(sandbox, ep.sandbox_id, command, settings.command_timeout_s, ep.exec_opts)

    outcome = await registry.execute(call, run, timeout_s=settings.command_timeout_s)
    return outcome.status, outcome.text, outcome.done
