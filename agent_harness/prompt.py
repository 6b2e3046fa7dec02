"""Prompt and observation token construction (the context the policy sees).

Token accounting is by construction: the sequence fed to the engine is always
``prompt + Σ (action + observation)`` built from these token lists, never re-tokenised text.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agent_harness.tools import ToolRegistry, format_tool_call

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_OBS_HEAD = f"\n{IM_START}user\n{TOOL_RESPONSE_OPEN}\n"
_OBS_TAIL = f"\n{TOOL_RESPONSE_CLOSE}{IM_END}\n{IM_START}assistant\n"


def _example_call(registry: ToolRegistry) -> str:
    """A call of the registry's first tool (``bash`` keeps its familiar ``ls`` example)."""
    spec = next(iter(registry.specs.values()))
    if spec.name == "bash":
        return format_tool_call("bash", {"command": "ls"})
    return format_tool_call(spec.name, {name: "..." for name in spec.params})


def system_prompt(registry: ToolRegistry) -> str:
    """Short on purpose: every token of it is context for a tiny model."""
    tools = "\n".join(msgspec.json.encode(s).decode() for s in registry.schemas())
    example = _example_call(registry)
    return (
        "You are an agent in a Linux shell. Use one tool per turn.\n"
        f"Tools:\n{tools}\nCall a tool like this:\n{example}"
    )


def messages_for(instruction: str, registry: ToolRegistry) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt(registry)},
        {"role": "user", "content": instruction},
    ]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (special tokens in text are atomic)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_tokens(tokenizer: Any, instruction: str, registry: ToolRegistry) -> list[int]:
    """System + user message through the chat template, ending with the assistant header."""
    text = tokenizer.apply_chat_template(
        messages_for(instruction, registry), add_generation_prompt=True, tokenize=False
    )
    return encode(tokenizer, text)


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], str]:
    """Tokens of ``text``; if longer than ``max_tokens``, keep the head and tail around a marker."""
    ids = encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return ids, text
    marker = encode(tokenizer, f"\n[... {len(ids)} tokens, middle cut ...]\n")
    keep = max(max_tokens - len(marker), 2)
    head, tail = ids[: keep - keep // 2], ids[len(ids) - keep // 2 :]
    kept = head + marker + tail
    return kept, tokenizer.decode(kept, skip_special_tokens=False)


def observation_tokens(tokenizer: Any, body_tokens: list[int], *, action_closed: bool) -> list[int]:
    """Close the assistant message (unless the policy did), then the tool response as a user turn,
    then the next assistant header."""
    head = _OBS_HEAD if action_closed else IM_END + _OBS_HEAD
    return encode(tokenizer, head) + body_tokens + encode(tokenizer, _OBS_TAIL)


def render_transcript(instruction: str, turns: list[tuple[str, str]], registry: ToolRegistry) -> str:
    """Text of a whole episode (assistant call, tool response)*; used for the tokenizer corpus."""
    parts = [f"{IM_START}system\n{system_prompt(registry)}{IM_END}\n"]
    parts.append(f"{IM_START}user\n{instruction}{IM_END}\n{IM_START}assistant\n")
    for action, response in turns:
        parts.append(action)
        parts.append(f"{IM_END}{_OBS_HEAD}{response}{_OBS_TAIL}")
    return "".join(parts)
