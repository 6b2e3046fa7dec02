"""The ``files`` family's text for training the default policy's tokenizer.

Expert transcripts of built-in tasks (instructions, tool calls, tool responses, rendered with the
real system prompt and tools), some shell noise and the plain words: what the tiny policy will read
and write. ``agent_harness.policy_init.create_tiny_policy`` receives it from its caller.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from agent_harness.prompt import render_transcript
from agent_harness.tools import ToolRegistry, format_tool_call
from producers.families.files.tasks import WORDS, builtin_tasks, solution_commands

_SHELL_NOISE = (
    "cat: {f}: No such file or directory\n",
    "sh: 1: {w}: not found\n",
    "bash: {w}: command not found\n",
    "ls: cannot access '{f}': No such file or directory\n",
    "[exit code 1]",
    "[exit code 127]",
    "error: unknown tool '{w}'; tools: bash, submit",
    "error: the tool call is not valid JSON",
    "error: no <tool_call> in the message",
    "answer.txt\nnote.txt\nstart.txt\n{f}\n",
    "[timed out after 10s]",
    "[output truncated]",
    "submitted",
)


def corpus(*, seed: int = 0, episodes: int = 600) -> Iterator[str]:
    """Expert transcripts of built-in tasks plus some shell noise and plain words."""
    rng = random.Random(seed)
    registry = ToolRegistry()
    for task in builtin_tasks(seed=seed, count=episodes, levels=(1, 2, 3, 4)):
        chain = task.metadata["chain"].split()
        word = task.metadata["answer"]
        turns = []
        responses = [*chain[1:], word] if chain else []
        for cmd, resp in zip(solution_commands(task), [*responses, ""], strict=False):
            turns.append((format_tool_call("bash", {"command": cmd}), f"{resp}\n" if resp else ""))
        turns.append((format_tool_call("submit", {"answer": word}), "submitted"))
        yield render_transcript(task.instruction, turns, registry)
        f = f"{rng.choice(('box', 'map', 'note', 'start', 'key'))}.txt"
        yield rng.choice(_SHELL_NOISE).format(f=f, w=rng.choice(WORDS))
    yield " ".join(WORDS) + "\n"
    yield "ls cat echo printf grep head tail wc sort test cd pwd mkdir rm cp mv true false > >> | && ;"
