"""The agent loop: one episode of one task sample in one sandbox, segmented into chunks.

Token accounting is exact by construction: ``prompt_tokens + Σ (action_tokens + obs_tokens)``
is the sequence the engine was last fed plus what it generated. The observation that follows the
final chunk is never fed to the engine, so the final chunk keeps its ``obs_text`` but no
``obs_tokens``. Prompts and tool results are rendered with the policy's chat template, turn by
turn (``agent_harness.prompt.Conversation``).

Context budget: a long observation keeps its head and tail (``max_observation_tokens``), and is cut
further so that ``min_turn_tokens`` stay free for the next turn within ``max_total_tokens``; the
cut is recorded in the chunk's ``obs_text`` (``[... N tokens, middle cut ...]``). Context already
fed to the engine is never edited: eliding old observations would change the prefix under which
earlier chunks' behaviour log-probabilities were computed, and the learner rebuilds one sequence
per trajectory. So when even a cut observation cannot fit, the episode ends as ``truncated`` with
``abort_reason`` ``context_budget: ...`` (the last observation kept as text, not as tokens).

Durable episodes (``agent_harness.episode``): a ``Journal`` records every chunk once its tool call
returned; a ``Resume`` goes on from recorded chunks after a rollout worker died.

The loop creates the sandbox but does not close it: the reward worker verifies inside it first.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog

from agent_harness.engine import GenRequest, InferenceEngine, sampling_seed
from agent_harness.episode import (
    Episode,
    Journal,
    Resume,
    SandboxAPI,
    SandboxFailed,
    act,
    create_sandbox,
    finish,
    setup_sandbox,
    start_sandbox,
)
from agent_harness.prompt import Conversation, Frame, encode, truncate_middle
from agent_harness.settings import HarnessSettings
from agent_harness.task_sandbox import episode_timeout, exec_options
from agent_harness.tools import ParseError, ToolCall, ToolRegistry, format_tool_call, parse_tool_call
from schemas.arrays import pack_logprobs, pack_tokens, unpack_tokens
from schemas.task import TaskSample
from schemas.trajectory import Chunk, Trajectory, TrajSource

log = structlog.get_logger(__name__)

__all__ = [
    "Journal",
    "Resume",
    "SandboxAPI",
    "SandboxFailed",
    "create_sandbox",
    "run_episode",
    "setup_sandbox",
]


async def run_episode(
    sample: TaskSample,
    *,
    engine: InferenceEngine,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    before_turn: Callable[[], Awaitable[None]] | None = None,
    source: TrajSource = "online",
    registry: ToolRegistry | None = None,
    tool_format: str = "auto",
    journal: Journal | None = None,
    resume: Resume | None = None,
) -> Trajectory:
    """Run one episode; sandbox failures give an ``aborted`` trajectory, they never raise.

    ``tool_format`` names how the policy writes tool calls (``agent_harness.formats``; ``auto``:
    from its chat template). A template that cannot render episodes exactly raises
    ``ChatTemplateError`` before anything runs. With ``resume`` the episode goes on from recorded
    chunks (``Resume``); ``journal`` records it as it goes."""
    registry = registry or ToolRegistry()
    started = resume.started_at if resume is not None and resume.started_at else time.time()
    conv = Conversation(engine.tokenizer, registry, tool_format)
    ep = Episode(seq=conv.prompt(sample.task.instruction), journal=journal)
    ep.exec_opts = exec_options(sample.task)
    ep.prompt_len = len(ep.seq)
    with anyio.move_on_after(episode_timeout(sample.task, settings.episode_timeout_s)) as scope:
        try:
            if resume is None:
                await start_sandbox(sample, sandbox, settings, ep)
                ep.prompt_len = await _replay_prefix(sample, sandbox, settings, registry, conv, ep)
                await _turns(sample, engine, sandbox, settings, registry, before_turn, conv, ep)
            elif not await _resume(sample, sandbox, settings, registry, resume, conv, ep):
                await _turns(sample, engine, sandbox, settings, registry, before_turn, conv, ep)
        except SandboxFailed as exc:
            ep.status, ep.abort_reason = "aborted", str(exc)
    if scope.cancelled_caught:
        ep.status, ep.abort_reason = "truncated", "episode_timeout"
    await finish(sandbox, registry, ep, settings)
    return _trajectory(sample, ep, engine.version, started, source, resume)


def _trajectory(
    sample: TaskSample,
    ep: Episode,
    version: int,
    started: float,
    source: TrajSource,
    resume: Resume | None,
) -> Trajectory:
    if ep.chunks and ep.chunks[-1].obs_tokens:  # nothing was generated after it
        ep.chunks[-1] = msgspec.structs.replace(ep.chunks[-1], obs_tokens=b"")
    versions = [c.policy_version for c in ep.chunks] or [version]
    traj = Trajectory(
        traj_id=sample.msg_id,
        run=sample.run,
        task_id=sample.task.task_id,
        family=sample.task.family,
        group_id=sample.group_id,
        sample_idx=sample.sample_idx,
        prompt_tokens=pack_tokens(ep.seq[: ep.prompt_len]),
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
        resumed=resume.resumed if resume is not None else 0,
    )
    log.debug("episode", traj_id=traj.traj_id, status=traj.status, chunks=len(traj.chunks))
    return traj


async def _replay_prefix(
    sample: TaskSample,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    conv: Conversation,
    ep: Episode,
    *,
    execute: bool = True,
) -> int:
    """Run ``sample.prefix_calls`` (chunk-level resampling; Hermes text, written again in the
    policy's own format) and fold them into the prompt: they are context for the policy, not its
    actions, so they carry no loss. ``execute=False`` only renders them (a resumed episode whose
    sandbox already holds their effects: the conversation must still know those turns)."""
    tok = conv.tokenizer
    for text in sample.prefix_calls:
        call = parse_tool_call(text)
        action = encode(tok, conv.write_call(call) if isinstance(call, ToolCall) else text)
        frame = conv.frame(action)
        if execute:
            _, raw_text, _ = await act(call, sandbox, settings, registry, ep)
            body, shown = truncate_middle(tok, raw_text, settings.max_observation_tokens)
            ep.seq += action + conv.observation(frame, body, shown)
        conv.commit(frame)
    return len(ep.seq)


async def _resume(
    sample: TaskSample,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    resume: Resume,
    conv: Conversation,
    ep: Episode,
) -> bool:
    """Restore the episode ``resume`` recorded: its exact token sequence and chunks, the
    conversation's turns, and a sandbox in the state they left (the live one, else a fresh one with
    setup, resampling prefix and every recorded tool call replayed, their outputs ignored). True if
    the recorded chunks ended it."""
    ep.chunks = list(resume.chunks)
    ep.seq = list(resume.prompt)
    for chunk in resume.chunks:
        ep.seq += unpack_tokens(chunk.action_tokens).tolist() + unpack_tokens(chunk.obs_tokens).tolist()
    ep.prompt_len = len(resume.prompt)
    ep.sandbox_id, ep.sandbox_owner = resume.sandbox_id, resume.sandbox_owner
    if resume.final is not None:
        ep.status, ep.abort_reason = resume.final, resume.abort_reason
        return True
    seq, prompt_len = ep.seq, ep.prompt_len
    if resume.sandbox_id:
        await _replay_prefix(sample, sandbox, settings, registry, conv, ep, execute=False)
    else:
        ep.seq = []
        await start_sandbox(sample, sandbox, settings, ep)
        await _replay_prefix(sample, sandbox, settings, registry, conv, ep)
        for chunk in resume.chunks:
            if chunk.tool_name and chunk.tool_status != "parse_error":
                await act(_recorded_call(chunk), sandbox, settings, registry, ep)
    ep.seq, ep.prompt_len = seq, prompt_len
    for chunk in resume.chunks:  # every recorded turn was followed by its tool result
        conv.commit(conv.frame(unpack_tokens(chunk.action_tokens).tolist()))
    log.info("episode_resumed", chunks=len(ep.chunks), reattached=bool(resume.sandbox_id))
    return False


def _recorded_call(chunk: Chunk) -> ToolCall | ParseError:
    """The tool call a recorded chunk made, as the registry executes it."""
    try:
        arguments = _json.decode(chunk.tool_args or "{}")
    except msgspec.DecodeError as exc:
        return ParseError("bad_json", str(exc))
    return parse_tool_call(format_tool_call(chunk.tool_name, arguments))


_json = msgspec.json.Decoder()


async def _turns(
    sample: TaskSample,
    engine: InferenceEngine,
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    before_turn: Callable[[], Awaitable[None]] | None,
    conv: Conversation,
    ep: Episode,
) -> None:
    tok = conv.tokenizer
    for index in range(len(ep.chunks), sample.task.max_turns):
        budget = settings.max_total_tokens - len(ep.seq)
        if budget < 1:
            ep.status, ep.abort_reason = "truncated", _budget_reason(ep, settings)
            return
        if before_turn is not None:
            await before_turn()
        version = engine.version
        request = GenRequest(
            list(ep.seq),
            min(settings.max_new_tokens_per_turn, budget),
            settings.temperature,
            conv.stop_ids,
            session=sample.msg_id,
            seed=sampling_seed(settings.seed, sample.msg_id, index),
        )
        t0 = time.perf_counter()
        [gen] = await engine.generate([request])
        gen_ms = (time.perf_counter() - t0) * 1000
        ep.seq += gen.tokens
        call = conv.format.parse(tok.decode(gen.tokens, skip_special_tokens=False))
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
            await ep.record(final=True)
            return
        if isinstance(call, ToolCall):
            base |= {"tool_name": call.name, "tool_args": call.arguments_json}
        if await _tool_turn(call, base, gen.tokens, sandbox, settings, registry, conv, ep):
            return
    ep.status = "truncated"


async def _tool_turn(
    call: ToolCall | ParseError,
    base: dict[str, Any],
    action: list[int],
    sandbox: SandboxAPI,
    settings: HarnessSettings,
    registry: ToolRegistry,
    conv: Conversation,
    ep: Episode,
) -> bool:
    """Run the turn's call, append its chunk and feed its result; True when the episode ended."""
    t1 = time.perf_counter()
    try:
        status, raw_text, done = await act(call, sandbox, settings, registry, ep)
    except SandboxFailed as exc:  # keep the action: the sequence stays exact when aborted
        ep.chunks.append(Chunk(**base, tool_status="error", obs_text=str(exc)))
        ep.status, ep.abort_reason = "aborted", str(exc)
        await ep.record(final=True)
        raise
    frame = conv.frame(action)
    obs: list[int] = []
    obs_text = raw_text
    if not done:
        obs, obs_text = _fit_observation(conv, frame, raw_text, len(ep.seq), settings)
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
    await ep.record(final=done)
    if not done:
        ep.seq += obs
        conv.commit(frame)
    return done


def _fit_observation(
    conv: Conversation, frame: Frame, text: str, used: int, settings: HarnessSettings
) -> tuple[list[int], str]:
    """Observation tokens (framing + body cut to head and tail) that leave ``min_turn_tokens``
    free; ``[]`` when not even a short cut body fits. A template that escapes results may make the
    rendered body longer than the cut one: the cut is then tightened by the difference."""
    framing = len(conv.observation(frame, [], ""))
    room = settings.max_total_tokens - used - settings.min_turn_tokens
    limit = min(settings.max_observation_tokens, room - framing)
    for _ in range(3):
        if limit < _MIN_BODY_TOKENS:
            return [], text
        body, shown = truncate_middle(conv.tokenizer, text, limit)
        if len(body) > limit:  # the cut marker itself did not fit
            return [], text
        obs = conv.observation(frame, body, shown)
        if len(obs) <= room:
            return obs, shown
        limit -= len(obs) - room
    return [], text


_MIN_BODY_TOKENS = 8


def _budget_reason(ep: Episode, settings: HarnessSettings) -> str:
    return f"context_budget: {len(ep.seq)} of {settings.max_total_tokens} tokens used"
