"""The built-in task family ``files``: small file-and-word puzzles solved in a real sandbox.

A level-L task needs L tool calls and then ``submit``:

- L1: "Write the word {w} to answer.txt."  -> ``echo {w} > answer.txt``
- L2: note.txt holds a word                 -> ``cat note.txt``, ``echo {w} > answer.txt``
- L>=3: start.txt names a file that names a file ... that holds a word (a chain of L-1 files).

The word vocabulary is small so that a tiny model can learn the family. Tasks are set up and
verified by shell commands in the ``base`` environment (sh + coreutils); verify succeeds iff
/work/answer.txt holds exactly the word.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from producers.families.base import TaskParams, TaskSandbox
from schemas.task import Task

FAMILY = "files"
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean",
    "maple", "robot", "candle", "forest", "silver", "rocket", "garden", "pepper",
)  # fmt: skip
FILE_STEMS = ("box", "map", "key", "door", "bag", "cup", "hat", "pen", "jar", "log")

INSTRUCTION_L1 = "Write the word {word} to answer.txt."
INSTRUCTION_L2 = "The file note.txt holds a word. Write that word to answer.txt."
INSTRUCTION_CHAIN = (
    "The file start.txt names a file. Follow the file names until you find a word. "
    "Write that word to answer.txt."
)


def _verify(word: str) -> list[str]:
    return ["test -f /work/answer.txt", f'test "$(cat /work/answer.txt)" = "{word}"']


def make_task(level: int, rng: random.Random, task_id: str, *, max_turns: int | None = None) -> Task:
    """One task of ``level`` drawn from ``rng``."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    word = rng.choice(WORDS)
    setup: list[str] = []
    chain: list[str] = []
    if level == 1:
        instruction = INSTRUCTION_L1.format(word=word)
    elif level == 2:
        instruction = INSTRUCTION_L2
        chain = ["note.txt"]
    else:
        instruction = INSTRUCTION_CHAIN
        stems = rng.sample(FILE_STEMS, k=min(level - 2, len(FILE_STEMS)))
        chain = ["start.txt", *(f"{s}.txt" for s in stems)]
    contents = [*chain[1:], word] if chain else []
    setup = [f"printf '%s\\n' '{c}' > /work/{f}" for f, c in zip(chain, contents, strict=True)]
    return Task(
        task_id=task_id,
        family=FAMILY,
        instruction=instruction,
        environment="base",
        setup=setup,
        verify=_verify(word),
        max_turns=max_turns if max_turns is not None else level + 3,
        difficulty=level,
        metadata={"level": str(level), "answer": word, "chain": " ".join(chain)},
    )


def builtin_tasks(*, seed: int, count: int, levels: Sequence[int] = (1, 2, 3)) -> list[Task]:
    """``count`` tasks cycling through ``levels``; the same seed gives the same tasks and ids."""
    if not levels:
        raise ValueError("levels must not be empty")
    rng = random.Random(f"files:{seed}")
    return [
        make_task(levels[i % len(levels)], rng, f"{FAMILY}-s{seed}-{i:05d}-L{levels[i % len(levels)]}")
        for i in range(count)
    ]


def task_at(seed: int, index: int, levels: Sequence[int]) -> Task:
    """Task number ``index`` of the endless built-in stream (deterministic in seed and index)."""
    level = levels[index % len(levels)]
    rng = random.Random(f"{FAMILY}:{seed}:{index}")
    return make_task(level, rng, f"{FAMILY}-s{seed}-{index:06d}-L{level}")


async def make_tasks(
    sandbox: TaskSandbox, params: TaskParams, *, seed: int, start: int, count: int
) -> list[Task]:
    """Tasks ``start .. start+count-1`` of the stream of ``seed`` at ``params.levels`` (no sandbox
    needed: the family's ``make_tasks`` hook)."""
    return [task_at(seed, i, tuple(params.levels)) for i in range(start, start + count)]


def solution_commands(task: Task) -> list[str]:
    """The bash commands of a correct solution (before ``submit``), from the task's metadata."""
    word = task.metadata["answer"]
    chain = task.metadata.get("chain", "").split()
    return [*(f"cat {f}" for f in chain), f"echo {word} > answer.txt"]
