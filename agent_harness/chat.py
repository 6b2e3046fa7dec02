"""OpenAI chat messages <-> the Qwen/Hermes token format the policy reads and writes.

Rendering is deterministic and piecewise (each message header, body and closing encoded on its
own), so the same message list always gives the same tokens and a conversation's next request
extends the previous one token for token. An assistant message that the proxy itself generated is
rendered from the exact tokens the engine produced (looked up by its tool-call ids or content),
never re-tokenised: that is what makes the recorded trajectory rebuild exactly.

The format matches ``agent_harness.prompt``: a system message followed by the tool schemas, tool
results as a user turn of ``<tool_response>`` blocks, and ``<|im_end|>`` after an assistant turn
unless the policy wrote it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from agent_harness.prompt import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    encode,
)
from agent_harness.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, format_tool_call, parse_tool_call

_json = msgspec.json.Encoder()


class ChatFormatError(ValueError):
    """A request whose messages cannot be rendered (one sentence naming the message and field)."""


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The tool section of the system message, as ``agent_harness.prompt.system_prompt`` writes it."""
    lines = "\n".join(_json.encode(t).decode() for t in tools)
    example = format_tool_call("bash", {"command": "ls"})
    return f"Tools:\n{lines}\nCall a tool like this:\n{example}"


def _text(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ChatFormatError(f"messages[{index}].content must be a string or a list of text parts")


def assistant_key(message: Mapping[str, Any], ordinal: int) -> str:
    """How a generated assistant message is recognised when the client sends it back: its tool-call
    ids (unique), else its position among the assistant messages and its text."""
    calls = message.get("tool_calls") or []
    if calls:
        return "calls:" + ",".join(str(c.get("id", "")) for c in calls)
    return f"content:{ordinal}:" + (_text(message, -1) or "")


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    generated: Mapping[str, list[int]],
) -> list[int]:
    """Token ids of ``messages`` followed by the assistant header (the generation prompt)."""
    if not messages:
        raise ChatFormatError("messages must not be empty")
    for index, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"messages[{index}] must be an object with a role")
    out: list[int] = []
    system = ""
    rest = messages
    if messages[0].get("role") in ("system", "developer"):
        system, rest = _text(messages[0], 0), messages[1:]
    if tools:
        system = f"{system}\n{tools_block(tools)}" if system else tools_block(tools)
    if system:
        out += encode(tokenizer, f"{IM_START}system\n{system}{IM_END}\n")
    offset = len(messages) - len(rest)
    i = ordinal = 0
    while i < len(rest):
        msg, index = rest[i], i + offset
        role = msg.get("role")
        if role == "user":
            out += encode(tokenizer, f"{IM_START}user\n{_text(msg, index)}{IM_END}\n")
        elif role == "assistant":
            out += _assistant(tokenizer, msg, index, generated.get(assistant_key(msg, ordinal)))
            ordinal += 1
        elif role == "tool":
            bodies = []
            while i < len(rest) and rest[i].get("role") == "tool":
                bodies.append(f"{TOOL_RESPONSE_OPEN}\n{_text(rest[i], i + offset)}\n{TOOL_RESPONSE_CLOSE}")
                i += 1
            out += encode(tokenizer, f"{IM_START}user\n" + "\n".join(bodies) + f"{IM_END}\n")
            continue
        else:
            raise ChatFormatError(f"messages[{index}].role {role!r} is not system, user, assistant or tool")
        i += 1
    return out + encode(tokenizer, f"{IM_START}assistant\n")


def _assistant(tokenizer: Any, msg: Mapping[str, Any], index: int, exact: list[int] | None) -> list[int]:
    header = encode(tokenizer, f"{IM_START}assistant\n")
    if exact is not None:
        closed = bool(exact) and exact[-1] in _closing_ids(tokenizer)
        return header + exact + encode(tokenizer, "\n" if closed else f"{IM_END}\n")
    parts = [_text(msg, index)]
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = msgspec.json.decode(fn.get("arguments") or "{}")
        except msgspec.DecodeError:
            raise ChatFormatError(f"messages[{index}].tool_calls: arguments are not valid JSON") from None
        parts.append(format_tool_call(str(fn.get("name", "")), args))
    return header + encode(tokenizer, "\n".join(p for p in parts if p) + f"{IM_END}\n")


def _closing_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)}


def stop_ids(tokenizer: Any) -> list[int]:
    """Stop after ``</tool_call>`` (one call per turn, as the harness trains) or end of message."""
    return sorted(_closing_ids(tokenizer) | {tokenizer.convert_tokens_to_ids(TOOL_CALL_CLOSE)})


@dataclass(frozen=True, slots=True)
class Reply:
    """The assistant message parsed from generated text, in OpenAI's shape, and its chunk status."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    status: str  # "ok" (a tool call), "parse_error" (a malformed one), "none" (plain answer)
    first_call: ToolCall | None

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def parse_reply(text: str) -> Reply:
    """Split generated text into content and OpenAI ``tool_calls`` (Hermes ``<tool_call>`` blocks)."""
    for special in (IM_END, ENDOFTEXT):
        text = text.replace(special, "")
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return Reply(text.strip(), [], "none", None)
    calls: list[ToolCall] = []
    at = start
    while at >= 0:
        end = text.find(TOOL_CALL_CLOSE, at)
        parsed = parse_tool_call(text[at : end + len(TOOL_CALL_CLOSE)] if end >= 0 else text[at:])
        if not isinstance(parsed, ToolCall):
            return Reply(text.strip(), [], "parse_error", None)
        calls.append(parsed)
        at = text.find(TOOL_CALL_OPEN, end)
    tool_calls = [
        {
            "id": f"call_{secrets.token_hex(8)}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments_json},
        }
        for c in calls
    ]
    return Reply(text[:start].strip() or None, tool_calls, "ok", calls[0])
