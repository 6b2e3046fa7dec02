"""Tool-call formats: how a policy writes a tool call, keyed by name, detected from its template.

- ``hermes`` (Qwen, Hermes, the embedded policy):
  ``<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>``;
  generation also stops after ``</tool_call>`` (one call per turn).
- ``llama3_json`` (Llama 3.1+ JSON tool calling): the message is ``{"name": .., "parameters": {..}}``,
  optionally after ``<|python_tag|>``; several calls are separated by ``;``.
- ``mistral``: ``[TOOL_CALLS] [{"name": .., "arguments": {..}}, ...]``.

Every parser returns the calls of one assistant message or a ``ParseError`` whose kind the chunk
records (``no_tool_call`` for a plain answer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent_harness.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ParseError,
    ToolCall,
    format_tool_call,
    parse_tool_call,
)

_decoder = json.JSONDecoder()
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|</s>|<s>")


class ToolFormatError(ValueError):
    """No tool format fits the policy's chat template (one sentence naming ``policy.tool_format``)."""


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """One way of writing tool calls: parse all calls of a message, write one, when to stop."""

    name: str
    parse_all: Callable[[str], list[ToolCall] | ParseError]
    write: Callable[[ToolCall], str]
    stop_after: tuple[str, ...]  # tokens that end a turn but not the message (one call per turn)
    closers: tuple[str, ...]  # tokens that end the message, besides the template's end of turn
    markers: tuple[str, ...]  # strings in a chat template that mean this format

    def parse(self, text: str) -> ToolCall | ParseError:
        """The first tool call of an assistant message."""
        calls = self.parse_all(text)
        return calls[0] if isinstance(calls, list) else calls


def _call_of(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | ParseError:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParseError("bad_shape", 'the tool call needs {"name": <string>, "arguments": {...}}')
    key = next((k for k in args_keys if k in obj), None)
    args = obj.get(key, {}) if key else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return ParseError("bad_json", "the tool call's arguments are not valid JSON")
    if not isinstance(args, dict):
        return ParseError("bad_shape", f'"{key}" must be a JSON object')
    return ToolCall(name=obj["name"], arguments=args)


def _hermes_all(text: str) -> list[ToolCall] | ParseError:
    calls: list[ToolCall] = []
    at = text.find(TOOL_CALL_OPEN)
    if at < 0:
        return ParseError("no_tool_call", "no <tool_call> in the message")
    while at >= 0:
        end = text.find(TOOL_CALL_CLOSE, at)
        parsed = parse_tool_call(text[at : end + len(TOOL_CALL_CLOSE)] if end >= 0 else text[at:])
        if isinstance(parsed, ParseError):
            return parsed
        calls.append(parsed)
        at = text.find(TOOL_CALL_OPEN, end)
    return calls


def _hermes_write(call: ToolCall) -> str:
    return format_tool_call(call.name, call.arguments)


def _llama3_all(text: str) -> list[ToolCall] | ParseError:
    body = _SPECIAL.sub("", text).strip()
    if not body.startswith("{"):
        return ParseError("no_tool_call", "the message is not a JSON tool call")
    calls: list[ToolCall] = []
    at = 0
    while at < len(body):
        try:
            obj, at = _decoder.raw_decode(body, at)
        except ValueError as exc:
            return ParseError("bad_json", f"the tool call is not valid JSON ({exc})")
        call = _call_of(obj, ("parameters", "arguments"))
        if isinstance(call, ParseError):
            return call
        calls.append(call)
        at = len(body) - len(body[at:].lstrip().lstrip(";").lstrip())
    return calls


def _llama3_write(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)


MISTRAL_MARKER = "[TOOL_CALLS]"


def _mistral_all(text: str) -> list[ToolCall] | ParseError:
    start = text.find(MISTRAL_MARKER)
    if start < 0:
        return ParseError("no_tool_call", f"no {MISTRAL_MARKER} in the message")
    body = _SPECIAL.sub("", text[start + len(MISTRAL_MARKER) :]).strip()
    try:
        obj, _ = _decoder.raw_decode(body)
    except ValueError as exc:
        return ParseError("bad_json", f"the tool calls are not valid JSON ({exc})")
    items = obj if isinstance(obj, list) else [obj]
    calls: list[ToolCall] = []
    for item in items:
        call = _call_of(item, ("arguments", "parameters"))
        if isinstance(call, ParseError):
            return call
        calls.append(call)
    return calls or ParseError("bad_shape", f"{MISTRAL_MARKER} is followed by an empty list")


def _mistral_write(call: ToolCall) -> str:
    payload = json.dumps([{"name": call.name, "arguments": call.arguments}], ensure_ascii=False)
    return f"{MISTRAL_MARKER} {payload}"


FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat(
            "hermes", _hermes_all, _hermes_write, (TOOL_CALL_CLOSE,), ("<|endoftext|>",), (TOOL_CALL_OPEN,)
        ),
        ToolFormat("mistral", _mistral_all, _mistral_write, (), (), (MISTRAL_MARKER,)),
        ToolFormat(
            "llama3_json", _llama3_all, _llama3_write, (), ("<|eom_id|>",), ("<|python_tag|>", "ipython")
        ),
    )
}


def detect_format(template: str) -> ToolFormat:
    """The format whose marker the chat template mentions (hermes first: Qwen templates also
    mention none of the others)."""
    for fmt in FORMATS.values():
        if any(m in template for m in fmt.markers):
            return fmt
    raise ToolFormatError(
        "policy.tool_format = auto: the chat template names no known tool-call format; set "
        f"policy.tool_format to one of {', '.join(FORMATS)}."
    )


def tool_format(name: str, template: str) -> ToolFormat:
    """The format ``name`` names (``auto``: detected from ``template``)."""
    if name == "auto":
        return detect_format(template)
    if name not in FORMATS:
        raise ToolFormatError(f"policy.tool_format {name!r} is not one of auto, {', '.join(FORMATS)}.")
    return FORMATS[name]
