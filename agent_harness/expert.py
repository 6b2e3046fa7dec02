"""A scripted expert for the built-in ``files`` tasks, acting through the same harness.

It reads the episode so far from the prompt tokens it is fed (instruction, its earlier calls and
their tool responses), writes the next correct tool call as text, and tokenises it with the real
tokenizer, so its trajectories look exactly like the policy's (log-probabilities 0.0). Once per
episode, at the step that writes the answer, it errs with probability ``error_rate``: a wrong word
or a typo (the episode fails) or a malformed call (it recovers on the next turn).
"""

from __future__ import annotations

import random
import re
from typing import Any

from agent_harness.engine import Generation, GenRequest
from agent_harness.prompt import IM_START, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, encode
from agent_harness.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, format_tool_call, parse_tool_call
from producers.builtin import WORDS

_USER = f"{IM_START}user\n"
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r".*?(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)
_RESPONSE = re.compile(re.escape(TOOL_RESPONSE_OPEN) + r"\n(.*?)\n" + re.escape(TOOL_RESPONSE_CLOSE), re.S)
_WRITE = re.compile(r"Write the word (\w+) to answer\.txt")
_FIRST_FILE = re.compile(r"The file (\S+\.txt)")


class ScriptedExpert:
    """An ``InferenceEngine`` that solves built-in tasks by script (``load_weights`` only moves
    ``version``: its trajectories are stamped with the policy version it is told)."""

    def __init__(self, *, tokenizer: Any, error_rate: float = 0.25, seed: int, version: int = 0) -> None:
        self.tokenizer = tokenizer
        self.error_rate = error_rate
        self.version = version
        self._rng = random.Random(seed)

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        return [self._one(r) for r in requests]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self.version = version

    def _one(self, req: GenRequest) -> Generation:
        text = self.tokenizer.decode(req.prompt_tokens, skip_special_tokens=False)
        tokens = encode(self.tokenizer, self.next_action(text))
        stops = set(req.stop_token_ids or ())
        for i, t in enumerate(tokens):
            if t in stops:
                tokens = tokens[: i + 1]
                return Generation(tokens, [0.0] * len(tokens), "stop", self.version)
        if len(tokens) > req.max_new_tokens:
            tokens = tokens[: req.max_new_tokens]
            return Generation(tokens, [0.0] * len(tokens), "length", self.version)
        return Generation(tokens, [0.0] * len(tokens), "stop", self.version)

    def next_action(self, context: str) -> str:
        """The next assistant message given the whole episode text so far."""
        start = context.find(_USER)
        body = context[start + len(_USER) :] if start >= 0 else context
        instruction = body.split("<|im_end|>", 1)[0]
        calls = [parse_tool_call(m.group(0)) for m in _CALL.finditer(body)]
        responses = _RESPONSE.findall(body)
        last = _last_valid(calls, responses)
        if last is None:
            write = _WRITE.search(instruction)
            if write:
                return self._answer(write.group(1))
            first = _FIRST_FILE.search(instruction)
            return _bash(f"cat {first.group(1) if first else 'note.txt'}")
        call, response = last
        command = call.arguments.get("command", "")
        if command.startswith("cat "):
            found = response.strip().splitlines()[0].strip() if response.strip() else ""
            return _bash(f"cat {found}") if found.endswith(".txt") else self._answer(found)
        if command.startswith("echo "):
            word = command.split()[1] if len(command.split()) > 1 else ""
            return format_tool_call("submit", {"answer": word})
        return format_tool_call("submit", {"answer": ""})

    def _answer(self, word: str) -> str:
        if self._rng.random() >= self.error_rate:
            return _bash(f"echo {word} > answer.txt")
        kind = self._rng.random()
        if kind < 0.5:
            wrong = self._rng.choice([w for w in WORDS if w != word] or ["x"])
            return _bash(f"echo {wrong} > answer.txt")
        if kind < 0.8 and len(word) > 1:
            i = self._rng.randrange(len(word) - 1)
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
            if typo == word:
                typo = word + word[-1]
            return _bash(f"echo {typo} > answer.txt")
        return (
            f'{TOOL_CALL_OPEN}\n{{"name": "bash", "arguments": {{"command": "echo {word}"\n{TOOL_CALL_CLOSE}'
        )


def _bash(command: str) -> str:
    return format_tool_call("bash", {"command": command})


def _last_valid(calls: list[Any], responses: list[str]) -> tuple[ToolCall, str] | None:
    for call, response in reversed(list(zip(calls, responses, strict=False))):
        if isinstance(call, ToolCall) and call.name == "bash":
            return call, response
    return None
