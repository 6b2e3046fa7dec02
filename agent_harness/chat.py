"""OpenAI chat messages <-> the tokens the policy reads and writes, through its chat template.

Rendering is deterministic: the messages go through the tokenizer's chat template (with the
request's ``tools``), so the same message list always gives the same tokens and a conversation's
next request extends the previous one token for token when the template is prefix-consistent
(``agent_harness.prompt.Conversation`` checks that of every template it renders with). An assistant
message that the proxy itself generated is rendered from the exact tokens the engine produced
(looked up by its tool-call ids or content), never re-tokenised: the template renders a placeholder
there, the text is split at the placeholders, and the exact tokens go in between (less the
template's end-of-turn marker when the policy wrote it). That is what makes the recorded trajectory
rebuild exactly. Other assistant messages carry their tool calls written in the policy's own
format (``agent_harness.formats``).
"""

from __future__ import annotations

import json
import secrets
import string
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent_harness.formats import FORMATS, ToolFormat
from agent_harness.prompt import Conversation, encode
from agent_harness.tools import ToolCall, ToolRegistry

_PLACEHOLDER = "RSGENERATED{}Q"
_ID_CHARS = string.ascii_letters + string.digits
_SPECIAL_TEXT = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "</s>")
_formats: weakref.WeakKeyDictionary[Any, dict[str, Conversation]] = weakref.WeakKeyDictionary()


class ChatFormatError(ValueError):
    """A request whose messages cannot be rendered (one sentence naming the message and field)."""


def chat_format(tokenizer: Any, tool_format: str = "auto") -> Conversation:
    """The tokenizer's template facts (format, end of turn, stop ids), probed once per tokenizer."""
    per_tok = _formats.setdefault(tokenizer, {})
    if tool_format not in per_tok:
        per_tok[tool_format] = Conversation(tokenizer, ToolRegistry(), tool_format)
    return per_tok[tool_format]


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
    tool_format: str = "auto",
) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt."""
    conv = chat_format(tokenizer, tool_format)
    msgs, exact = _template_messages(messages, generated, conv.format)
    if conv.fold_system and len(msgs) > 1 and msgs[0]["role"] == "system" and msgs[1]["role"] == "user":
        # templates that move the system text (Mistral's) are prefix-consistent only without it
        msgs[1:2] = [{"role": "user", "content": f"{msgs[0]['content']}\n\n{msgs[1]['content']}"}]
        msgs = msgs[1:]
    try:
        text: str = tokenizer.apply_chat_template(
            msgs, tools=tools or None, chat_template=conv.template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # noqa: BLE001 -- the template's own refusal (e.g. its role rules)
        raise ChatFormatError(f"the chat template cannot render these messages: {exc}") from None
    out: list[int] = []
    for i, piece in enumerate(_split(text, len(exact))):
        if i > 0 and exact[i - 1] and exact[i - 1][-1] in conv.closing_ids and conv.end_of_turn:
            piece = piece.removeprefix(conv.end_of_turn)
        if i < len(exact) and conv.assistant_lead:
            piece = piece.removesuffix(conv.assistant_lead)
        out += encode(tokenizer, piece)
        if i < len(exact):
            out += exact[i]
    return out


def _template_messages(
    messages: list[dict[str, Any]], generated: Mapping[str, list[int]], fmt: ToolFormat
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The messages as the template takes them (generated ones as placeholders) and the exact
    tokens of each placeholder, in order."""
    if not messages:
        raise ChatFormatError("messages must not be empty")
    out: list[dict[str, Any]] = []
    exact: list[list[int]] = []
    ordinal = 0
    for index, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"messages[{index}] must be an object with a role")
        role = msg.get("role")
        if role in ("system", "developer") and index == 0:
            out.append({"role": "system", "content": _text(msg, index)})
        elif role == "user":
            out.append({"role": "user", "content": _text(msg, index)})
        elif role == "assistant":
            tokens = generated.get(assistant_key(msg, ordinal))
            ordinal += 1
            if tokens is not None:
                out.append({"role": "assistant", "content": _PLACEHOLDER.format(len(exact))})
                exact.append(tokens)
            else:
                out.append({"role": "assistant", "content": _written(msg, index, fmt)})
        elif role == "tool":
            call_id = str(msg.get("tool_call_id") or "")
            out.append({"role": "tool", "content": _text(msg, index), "tool_call_id": call_id})
        else:
            raise ChatFormatError(f"messages[{index}].role {role!r} is not system, user, assistant or tool")
    return out, exact


def _split(text: str, n: int) -> list[str]:
    pieces: list[str] = []
    at = 0
    for i in range(n):
        found = text.find(_PLACEHOLDER.format(i), at)
        if found < 0:
            raise ChatFormatError("the chat template dropped an earlier assistant message")
        pieces.append(text[at:found])
        at = found + len(_PLACEHOLDER.format(i))
    return [*pieces, text[at:]]


def _written(msg: Mapping[str, Any], index: int, fmt: ToolFormat) -> str:
    """An assistant message the policy did not generate: its text and its tool calls in ``fmt``."""
    parts = [_text(msg, index)]
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise ChatFormatError(f"messages[{index}].tool_calls: arguments are not valid JSON") from None
        parts.append(fmt.write(ToolCall(str(fn.get("name", "")), args)))
    return "\n".join(p for p in parts if p)


def stop_ids(tokenizer: Any, tool_format: str = "auto") -> list[int]:
    """Stop at the end of the message, or after one tool call where the format marks its end."""
    return chat_format(tokenizer, tool_format).stop_ids


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


def parse_reply(text: str, fmt: ToolFormat | None = None) -> Reply:
    """Split generated text into content and OpenAI ``tool_calls`` (``fmt``: the policy's tool-call
    format, Hermes ``<tool_call>`` blocks by default)."""
    fmt = fmt or FORMATS["hermes"]
    for special in _SPECIAL_TEXT:
        text = text.replace(special, "")
    parsed = fmt.parse_all(text)
    if isinstance(parsed, list):
        start = min((text.find(m) for m in fmt.markers if m in text), default=0)
        content = "" if fmt.name == "llama3_json" else text[:start].strip()  # llama: the call is all
        tool_calls = [
            {
                "id": "".join(secrets.choice(_ID_CHARS) for _ in range(9)),  # Mistral's id shape
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json},
            }
            for c in parsed
        ]
        return Reply(content or None, tool_calls, "ok", parsed[0])
    if parsed.kind == "no_tool_call":
        return Reply(text.strip(), [], "none", None)
    return Reply(text.strip(), [], "parse_error", None)
