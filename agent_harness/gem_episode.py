"""GEM games through the agent loop: an ``act`` tool and a scripted GuessTheNumber player.

``run_episode(sample, ..., registry=GemToolRegistry())`` plays a GEM task (``producers.gem_tasks``):
the task's setup resets the env in the sandbox, the instruction holds the first observation, each
``act`` call is one ``step`` (its observation is the tool response) and the episode ends when the
game does. The verifier is the driver's ``verify`` (won or not); the episode's summed reward is in
``/work/.gem/result.json``.
"""

from __future__ import annotations

import re
from typing import Any

from agent_harness.engine import Generation, GenRequest
from agent_harness.prompt import IM_START, encode
from agent_harness.tools import Executor, ToolCall, ToolOutcome, ToolRegistry, ToolSpec, format_tool_call
from sandboxd.gem import GemError, StepResult, decode_answer, step_command
from schemas.task import Task

ACT = ToolSpec(
    "act",
    "Make your move in the game; the game answers with what happened.",
    {"action": "your move, as the game asks for it (e.g. \\boxed{5})"},
)


def act_call(action: str) -> str:
    """The canonical text of an ``act`` call."""
    return format_tool_call("act", {"action": action})


def observation_text(step: StepResult) -> str:
    """The tool response of a step: GEM's observation, its prompt suffix while the game goes on,
    and the outcome when it is over."""
    text = step.observation
    suffix = step.info.get("suffix")
    if not step.done and isinstance(suffix, str) and suffix:
        text += f"\n{suffix}"
    if step.done:
        text += f"\n[game over: reward {step.total_reward:g}]"
    return text


class GemToolRegistry(ToolRegistry):
    """One tool, ``act``; a call is a ``step`` of the GEM env in the episode's sandbox."""

    def __init__(self) -> None:
        super().__init__((ACT,))

    async def execute(self, call: ToolCall, run: Executor, *, timeout_s: float) -> ToolOutcome:
        problem = self.check(call)
        if problem is not None:
            return ToolOutcome("error", f"error: {problem}")
        result = await run(step_command(call.arguments["action"]))
        if result.timed_out:
            return ToolOutcome("timeout", f"[the game did not answer within {timeout_s:g}s]")
        try:
            step = decode_answer(result, StepResult)
        except GemError as exc:
            # A finished or missing episode cannot go on; anything else is the env's own failure.
            return ToolOutcome(
                "error", f"error: {exc.message}", done=exc.kind in ("episode_over", "no_episode")
            )
        return ToolOutcome("ok", observation_text(step), done=step.done)


_RANGE = re.compile(r"between (\d+) and (\d+)")
_HINT = re.compile(r"you guessed (\d+), and the target number is (higher|lower) than")


class GuessTheNumberExpert:
    """An ``InferenceEngine`` that plays ``game:GuessTheNumber-*`` by binary search through ``act``
    calls, tokenised with the real tokenizer (log-probabilities 0.0), like ``ScriptedExpert``."""

    def __init__(self, *, tokenizer: Any, version: int = 0) -> None:
        self.tokenizer = tokenizer
        self.version = version

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        return [self._one(r) for r in requests]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self.version = version

    def _one(self, req: GenRequest) -> Generation:
        text = self.tokenizer.decode(req.prompt_tokens, skip_special_tokens=False)
        tokens = encode(self.tokenizer, act_call(f"\\boxed{{{next_guess(text)}}}"))[: req.max_new_tokens]
        stops = set(req.stop_token_ids or ())
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        return Generation(tokens[:cut], [0.0] * cut, "stop", self.version)


def next_guess(context: str) -> int:
    """The binary-search guess given the episode so far (instruction and the game's hints)."""
    user = context.find(f"{IM_START}user\n")
    body = context[user:] if user >= 0 else context
    found = _RANGE.search(body)
    low, high = (int(found.group(1)), int(found.group(2))) if found else (1, 100)
    for guess, hint in _HINT.findall(body):
        if hint == "higher":
            low = max(low, int(guess) + 1)
        else:
            high = min(high, int(guess) - 1)
    return (low + max(low, high)) // 2


def registry_for(task: Task) -> ToolRegistry | None:
    """The tools a task's episode offers: ``act`` for GEM families, the default (bash, submit) else."""
    return GemToolRegistry() if task.family.startswith("gem:") else None
