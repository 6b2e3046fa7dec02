"""Prompt and observation tokens, rendered with the policy tokenizer's own chat template.

Token accounting is by construction: the sequence fed to the engine is always
``prompt + Σ (action + observation)`` built from these token lists, never re-tokenised text.

A ``Conversation`` renders one episode incrementally. Each turn it renders the whole conversation
through the template with placeholders for the assistant messages (the policy's exact tokens go
there) and for the tool results, splits the text at the placeholders and checks that every piece
already fed comes out the same (prefix consistency); the new pieces frame the next tool result.
A template that is not prefix-consistent fails loudly (``ChatTemplateError``) when the
conversation is made, by a two-turn probe, rather than producing a sequence the policy never saw.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

from agent_harness.formats import ToolFormat, tool_format
from agent_harness.tokenizer import CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE
from agent_harness.tokenizer import ENDOFTEXT as ENDOFTEXT  # the embedded policy's tokens, re-exported
from agent_harness.tokenizer import IM_END as IM_END
from agent_harness.tokenizer import IM_START as IM_START
from agent_harness.tokenizer import TOOL_RESPONSE_CLOSE as TOOL_RESPONSE_CLOSE
from agent_harness.tokenizer import TOOL_RESPONSE_OPEN as TOOL_RESPONSE_OPEN
from agent_harness.tools import ToolCall, ToolRegistry, format_tool_call

SYSTEM = "You are an agent in a Linux shell. Use one tool per turn."
_ACTION = "RSACTION{}Q"  # placeholders: plain words every template passes through unchanged
_RESULT = "RSRESULT{}Q"
_PROBE = 'a "quoted" line\\ <x> &\nnext'  # does the template pass tool results verbatim?


class ChatTemplateError(ValueError):
    """The policy's chat template cannot render episodes exactly (one sentence naming why)."""


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (special tokens in text are atomic)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template; policies made before tools went through the template get the
    embedded one (same tokens as before)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("the policy's tokenizer has no chat template (policy.path)")
    return CHAT_TEMPLATE if template == LEGACY_CHAT_TEMPLATE else template


@dataclass(frozen=True, slots=True)
class Frame:
    """What surrounds the next tool result: ``head`` closes the policy's message (unless the
    policy closed it) and opens the result; ``tail`` closes it and opens the next assistant turn."""

    head: str
    tail: str
    raw_head: str  # the template's head before the policy's own closing token was taken off


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a template's probe found (see ``Conversation._probe``)."""

    fold_system: bool
    verbatim: bool
    end_of_turn: str
    assistant_lead: str
    closing_ids: set[int]
    stop_ids: list[int]


_FACTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], _Facts]] = weakref.WeakKeyDictionary()


class Conversation:
    """One episode's context, rendered with the chat template turn by turn."""

    def __init__(self, tokenizer: Any, registry: ToolRegistry, tool_format_name: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.template = template_of(tokenizer)
        self.format: ToolFormat = tool_format(tool_format_name, self.template)
        self.tools = registry.schemas()
        self._tool_names = list(registry.specs)
        self.fold_system = False
        self._instruction = "Do the task."
        self._pieces: list[str] = []  # template text already fed: prompt, (head, tail) per turn
        self._verbatim = True
        self.assistant_lead = ""  # whitespace the template puts before an assistant message's text
        self.end_of_turn = ""
        self.closing_ids: set[int] = set()
        self.stop_ids: list[int] = []
        self._adopt(self._facts())

    # -- rendering ------------------------------------------------------------------------------

    def prompt(self, instruction: str) -> list[int]:
        """System + user message with the tools, ending with the generation prompt."""
        self._instruction = instruction
        text = self._render(0)
        self._pieces = [text]
        return encode(self.tokenizer, text)

    def frame(self, action: list[int]) -> Frame:
        """The framing of the tool result that follows ``action`` (checked prefix-consistent)."""
        turn = (len(self._pieces) + 1) // 2
        pieces = self._split(self._render(turn), turn)
        for i, (old, new) in enumerate(zip(self._pieces, pieces, strict=False)):
            if i % 2 == 0 and new.startswith(old) and not new[len(old) :].strip():
                self.assistant_lead = new[len(old) :]  # e.g. Mistral's " ": the policy writes it
                continue
            if new != old:
                raise ChatTemplateError(
                    f"the chat template re-renders earlier turns differently (piece {i}: {old[-40:]!r} "
                    f"became {new[-40:]!r}); rollstream needs a prefix-consistent template"
                )
        head, tail = pieces[-2], pieces[-1]
        closed = bool(action) and action[-1] in self.closing_ids
        if closed and self.end_of_turn and head.startswith(self.end_of_turn):
            return Frame(head[len(self.end_of_turn) :], tail, head)
        return Frame(head, tail, head)

    def observation(self, frame: Frame, body: list[int], shown: str) -> list[int]:
        """The tokens fed after the action: ``frame`` around the result ``body`` (whose text is
        ``shown``). A template that escapes results (JSON) renders the text instead of splicing."""
        tok = self.tokenizer
        if self._verbatim:
            return encode(tok, frame.head) + body + encode(tok, frame.tail)
        turn = (len(self._pieces) + 1) // 2
        text = self._render(turn, last_result=shown)
        at = text.rindex(_ACTION.format(turn)) + len(_ACTION.format(turn)) + len(frame.raw_head)
        end = len(text) - len(frame.tail)
        return encode(tok, frame.head) + encode(tok, text[at:end]) + encode(tok, frame.tail)

    def commit(self, frame: Frame) -> None:
        """Record that ``frame`` was fed (the next turn's check covers it)."""
        self._pieces += [frame.raw_head, frame.tail]

    def write_call(self, call: ToolCall) -> str:
        """A tool call as this policy writes it (prefix calls of resampled episodes)."""
        return self.format.write(call)

    # -- internals ------------------------------------------------------------------------------

    def _messages(self, turns: int, last_result: str | None = None) -> list[dict[str, Any]]:
        if self.fold_system:
            msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{SYSTEM}\n\n{self._instruction}"}]
        else:
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self._instruction}]
        name = self._tool_names[0] if self._tool_names else "tool"
        for k in range(1, turns + 1):
            result = last_result if (k == turns and last_result is not None) else _RESULT.format(k)
            msgs.append({"role": "assistant", "content": _ACTION.format(k)})
            msgs.append({"role": "tool", "content": result, "tool_call_id": f"call{k:05d}", "name": name})
        return msgs

    def _render(self, turns: int, last_result: str | None = None) -> str:
        text: str = self.tokenizer.apply_chat_template(
            self._messages(turns, last_result),
            tools=self.tools or None,
            chat_template=self.template,
            add_generation_prompt=True,
            tokenize=False,
        )
        return text

    def _split(self, text: str, turns: int) -> list[str]:
        """``[before action 1, action 1 → result 1, result 1 → action 2, ...]``."""
        pieces: list[str] = []
        at = 0
        for k in range(1, turns + 1):
            for marker in (_ACTION.format(k), _RESULT.format(k)):
                found = text.find(marker, at)
                if found < 0:
                    raise ChatTemplateError(f"the chat template dropped a message ({marker} is not rendered)")
                pieces.append(text[at:found])
                at = found + len(marker)
        pieces.append(text[at:])
        return pieces

    def _facts(self) -> _Facts:
        """What the probe learns, once per tokenizer, template, format and tool list."""
        key = (self.template, self.format.name, json.dumps(self.tools, sort_keys=True))
        try:
            known = _FACTS.setdefault(self.tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: probe every time
            known = {}
        if key not in known:
            end_of_turn = self._probe()
            closing = self._ids_of((end_of_turn, *self.format.closers))
            if self.tokenizer.eos_token_id is not None:
                closing.add(int(self.tokenizer.eos_token_id))
            stops = sorted(closing | self._ids_of(self.format.stop_after))
            known[key] = _Facts(
                self.fold_system, self._verbatim, end_of_turn, self.assistant_lead, closing, stops
            )
        return known[key]

    def _adopt(self, facts: _Facts) -> None:
        self.fold_system, self._verbatim = facts.fold_system, facts.verbatim
        self.end_of_turn, self.assistant_lead = facts.end_of_turn, facts.assistant_lead
        self.closing_ids, self.stop_ids = set(facts.closing_ids), list(facts.stop_ids)

    def _probe(self) -> str:
        """Check two turns render prefix-consistently (else retry with the system text folded into
        the user message, as templates that move the system message need); learn whether results
        pass verbatim and the end-of-turn marker the template writes after an assistant message."""
        for fold in (False, True):
            self.fold_system = fold
            try:
                self.prompt(self._instruction)
                for _ in range(2):
                    self.commit(self.frame([]))
                break
            except ChatTemplateError:
                if fold:
                    raise
        head = self._pieces[1]
        self._pieces = []
        probe = self._render(1, last_result=_PROBE)
        self._verbatim = _PROBE in probe
        return self._leading_special(head)

    def _leading_special(self, text: str) -> str:
        specials = sorted(self._special_tokens(), key=len, reverse=True)
        return next((s for s in specials if text.startswith(s)), "")

    def _special_tokens(self) -> set[str]:
        tok = self.tokenizer
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        return {str(t) for t in tok.all_special_tokens} | {str(t) for t in added.values()}

    def _ids_of(self, tokens: tuple[str, ...]) -> set[int]:
        vocab = self.tokenizer.get_vocab()
        return {vocab[t] for t in tokens if t in vocab}


def prompt_tokens(
    tokenizer: Any, instruction: str, registry: ToolRegistry, tool_format_name: str = "auto"
) -> list[int]:
    """System + user message through the chat template, ending with the generation prompt."""
    return Conversation(tokenizer, registry, tool_format_name).prompt(instruction)


def observation_tokens(tokenizer: Any, body_tokens: list[int], *, action_closed: bool) -> list[int]:
    """The first tool result's tokens in a fresh conversation with the default tools (benchmarks
    and tests that build sequences without running the loop)."""
    conv = Conversation(tokenizer, ToolRegistry())
    conv.prompt("Do the task.")
    closing = sorted(conv.closing_ids)[:1] if action_closed else []
    frame = conv.frame(closing)
    return conv.observation(frame, body_tokens, tokenizer.decode(body_tokens, skip_special_tokens=False))


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


def system_prompt(registry: ToolRegistry) -> str:
    """The embedded template's system message with the tools: the text the tokenizer trains on."""
    tools = "\n".join(json.dumps(s, separators=(",", ":"), ensure_ascii=False) for s in registry.schemas())
    spec = next(iter(registry.specs.values()))
    args = {"command": "ls"} if spec.name == "bash" else {name: "..." for name in spec.params}
    return f"{SYSTEM}\nTools:\n{tools}\nCall a tool like this:\n{format_tool_call(spec.name, args)}"


def render_transcript(instruction: str, turns: list[tuple[str, str]], registry: ToolRegistry) -> str:
    """Text of a whole episode (assistant call, tool response)* in the embedded template's format:
    the tokenizer's training corpus (no tokenizer exists yet to render it with)."""
    parts = [f"<|im_start|>system\n{system_prompt(registry)}<|im_end|>\n"]
    parts.append(f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
    for action, response in turns:
        parts.append(action)
        parts.append(
            f"<|im_end|>\n<|im_start|>user\n<tool_response>\n{response}\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    return "".join(parts)
