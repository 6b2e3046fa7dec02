"""The ``act`` tool: GEM games through the agent loop.

A GEM task's episode (``producers.families.gem.tasks``) offers one tool, ``act``: its setup resets
the env in the sandbox, the instruction holds the first observation, each ``act`` call is one
``step`` (its observation is the tool response) and the episode ends when the game does. The
verifier is the driver's ``verify`` (won or not); the episode's summed reward is in
``/work/.gem/result.json``.
"""

from __future__ import annotations

from agent_harness.tools import Executor, ToolCall, ToolOutcome, ToolRegistry, ToolSpec, format_tool_call
from producers.families.gem.api import GemError, StepResult, decode_answer, step_command, stop_command
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

    def finish_command(self) -> str | None:
        return stop_command()

    def command(self, call: ToolCall) -> str | None:
        return step_command(call.arguments["action"]) if call.name == "act" else None

    async def execute(self, call: ToolCall, run: Executor, *, timeout_s: float) -> ToolOutcome:
        problem = self.check(call)
        command = self.command(call) if problem is None else None
        if command is None:
            return ToolOutcome("error", f"error: {problem}")
        result = await run(command)
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


def gem_tools(task: Task) -> ToolRegistry:
    """The tools of a GEM task's episode (the family's ``tools`` hook)."""
    return GemToolRegistry()
