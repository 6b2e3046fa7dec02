"""The scripted expert of the ``files`` family, acting through the same harness as the policy.

A ``ScriptedEngine``: it reads the episode so far from the prompt tokens it is fed (instruction, its
earlier calls and their tool responses) and writes the next correct tool call. Once per episode, at
the step that writes the answer, it errs with probability ``error_rate``: a wrong word or a typo
(the episode fails) or a malformed call (it recovers on the next turn). With probability
``shortcut`` it answers a level-2 task by copying the whole note (``cp note.txt answer.txt``) without
reading it: right when the note holds only the word, wrong when ``producer.note_extra`` gave it a
second line.
"""

from __future__ import annotations

import random
import re
from typing import Any

from agent_harness.prompt import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN
from agent_harness.scripted import ScriptedEngine, episode_body
from agent_harness.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, format_tool_call, parse_tool_call
from producers.families.files.tasks import WORDS

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r".*?(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)
_RESPONSE = re.compile(re.escape(TOOL_RESPONSE_OPEN) + r"\n(.*?)\n" + re.escape(TOOL_RESPONSE_CLOSE), re.S)
_WRITE = re.compile(r"Write the word (\w+) to answer\.txt")
_FIRST_FILE = re.compile(r"The file (\S+\.txt)")
SHORTCUT = "cp note.txt answer.txt"


class FilesExpert(ScriptedEngine):
    """Solves ``files`` tasks by script, erring once per episode with probability ``error_rate``."""

    def __init__(
        self, *, tokenizer: Any, error_rate: float = 0.25, seed: int, version: int = 0, shortcut: float = 0.0
    ) -> None:
        super().__init__(tokenizer=tokenizer, version=version)
        self.error_rate = error_rate
        self.shortcut = shortcut
        self._rng = random.Random(seed)

    def next_action(self, context: str) -> str:
        """The next assistant message given the whole episode text so far."""
        body = episode_body(context)
        instruction = body.split("<|im_end|>", 1)[0]
        calls = [parse_tool_call(m.group(0)) for m in _CALL.finditer(body)]
        responses = _RESPONSE.findall(body)
        last = _last_valid(calls, responses)
        if last is None:
            write = _WRITE.search(instruction)
            if write:
                return self._answer(write.group(1))
            first = _FIRST_FILE.search(instruction)
            name = first.group(1) if first else "note.txt"
            # the random draw only when the shortcut is on: default episodes stay as they were
            if name == "note.txt" and self.shortcut > 0 and self._rng.random() < self.shortcut:
                return _bash(SHORTCUT)
            return _bash(f"cat {name}")
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
