"""Tool calls in the Hermes/Qwen format and the tool registry (``bash``, ``submit``).

The policy writes ``<tool_call>{"name": "...", "arguments": {...}}</tool_call>``; the harness
parses it, runs it and answers with an observation. Tool status: ``ok`` (the tool ran; a non-zero
exit code is a normal observation), ``error`` (unknown tool, bad arguments, OOM kill),
``timeout`` (the command hit its time limit), ``parse_error`` (no well-formed call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from schemas.sandbox import ExecResult
from schemas.task import Task

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return _json_encoder.encode(self.arguments).decode()


ParseErrorKind = Literal["no_tool_call", "missing_close", "bad_json", "bad_shape"]


@dataclass(frozen=True, slots=True)
class ParseError:
    kind: ParseErrorKind
    message: str


def parse_tool_call(text: str) -> ToolCall | ParseError:
    """Parse the first ``<tool_call>...</tool_call>`` block of an assistant message."""
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParseError("no_tool_call", "no <tool_call> in the message")
    body_start = start + len(TOOL_CALL_OPEN)
    end = text.find(TOOL_CALL_CLOSE, body_start)
    if end < 0:
        return ParseError("missing_close", "the tool call is not closed with </tool_call>")
    body = text[body_start:end].strip()
    try:
        obj = _json_decoder.decode(body)
    except msgspec.DecodeError as exc:
        return ParseError("bad_json", f"the tool call is not valid JSON ({exc})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParseError("bad_shape", 'the tool call needs {"name": <string>, "arguments": {...}}')
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return ParseError("bad_shape", '"arguments" must be a JSON object')
    return ToolCall(name=obj["name"], arguments=args)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical text of a tool call (what the expert writes and the policy should learn)."""
    payload = _json_encoder.encode({"name": name, "arguments": arguments}).decode()
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


class Executor(Protocol):
    """Runs a shell command in the episode's sandbox (bound by the loop)."""

    async def __call__(self, command: str) -> ExecResult: ...


ToolStatus = Literal["ok", "error", "timeout"]


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    status: ToolStatus
    text: str
    done: bool = False  # the episode ends after this call (submit)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    params: dict[str, str]  # parameter name -> description (all strings, all required)

    def schema(self) -> dict[str, Any]:
        """OpenAI function schema, as Qwen-style templates list tools."""
        props = {k: {"type": "string", "description": v} for k, v in self.params.items()}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {"type": "object", "properties": props, "required": list(self.params)},
            },
        }


BASH = ToolSpec("bash", "Run a shell command in /work and see its output.", {"command": "the command"})
SUBMIT = ToolSpec("submit", "Finish the task.", {"answer": "your final answer"})


class ToolRegistry:
    """The tools an episode offers; ``execute`` never raises for the policy's mistakes."""

    def __init__(self, specs: tuple[ToolSpec, ...] = (BASH, SUBMIT)) -> None:
        self.specs = {s.name: s for s in specs}

    def schemas(self) -> list[dict[str, Any]]:
        return [s.schema() for s in self.specs.values()]

    def check(self, call: ToolCall) -> str | None:
        """Why this call cannot run (unknown tool, missing or non-string arguments), or None."""
        spec = self.specs.get(call.name)
        if spec is None:
            return f"unknown tool {call.name!r}; tools: {', '.join(self.specs)}"
        for param in spec.params:
            if not isinstance(call.arguments.get(param), str):
                return f"tool {call.name!r} needs a string argument {param!r}"
        extra = set(call.arguments) - set(spec.params)
        if extra:
            return f"tool {call.name!r} has no argument {sorted(extra)[0]!r}"
        return None

    def finish_command(self) -> str | None:
        """A command the harness runs in the sandbox when the episode ends, whatever its status,
        outside the trajectory (e.g. to stop an environment's resident process, which the reward
        group's probe would otherwise see as a process left behind). None: nothing to run."""
        return None

    def command(self, call: ToolCall) -> str | None:
        """The shell command a valid call runs in the sandbox (None: it runs none, like ``submit``).
        The reward worker re-executes these to rebuild a lost sandbox."""
        return call.arguments["command"] if call.name == "bash" else None

    async def execute(self, call: ToolCall, run: Executor, *, timeout_s: float) -> ToolOutcome:
        """Run a call; sandbox failures (``SandboxError``) propagate to the loop, which aborts."""
        problem = self.check(call)
        if problem is not None:
            return ToolOutcome("error", f"error: {problem}")
        if call.name == "submit":
            return ToolOutcome("ok", "submitted", done=True)
        command = self.command(call)
        if command is None:
            return ToolOutcome("error", f"error: tool {call.name!r} runs nothing here")
        result = await run(command)
        return _exec_outcome(result, timeout_s)


ToolsFor = Callable[[Task], ToolRegistry]
"""The tools a task's episode offers (a task family's hook, passed to the rollout and reward
workers by whoever assembles them)."""


def default_tools(task: Task) -> ToolRegistry:
    """``bash`` and ``submit``, for every task."""
    return ToolRegistry()


def _exec_outcome(result: ExecResult, timeout_s: float) -> ToolOutcome:
    text = result.stdout + result.stderr
    if result.truncated:
        text += "\n[output truncated]"
    if result.timed_out:
        return ToolOutcome("timeout", f"{text}[timed out after {timeout_s:g}s]")
    if result.oom_killed:
        return ToolOutcome("error", f"{text}[killed: out of memory]")
    if result.exit_code != 0:
        text += f"[exit code {result.exit_code}]"
    return ToolOutcome("ok", text)
