"""The built-in task family ``files``: small file-and-word puzzles solved in a real sandbox.

A level-L task needs L tool calls and then ``submit``:

- L1: "Write the word {w} to answer.txt."  -> ``echo {w} > answer.txt``
- L2: note.txt holds a word                 -> ``cat note.txt``, ``echo {w} > answer.txt``
- L>=3: start.txt names a file that names a file ... that holds a word (a chain of L-1 files).

``note_extra`` (``producer.note_extra``, default 0) is the fraction of level-2 notes that carry a
second line after the word (``NOTE_TRAILER``): reading the note and writing its word still solves
the task, copying the whole note (``cp note.txt answer.txt``, the shortcut the scripted expert
takes with ``producer.expert_shortcut``) does not. Nothing in the instruction tells the two notes
apart, so only reward statistics show that the shortcut fails (docs/learning.md).

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
NOTE_TRAILER = "(end of note)"
INSTRUCTION_CHAIN = (
    "The file start.txt names a file. Follow the file names until you find a word. "
    "Write that word to answer.txt."
)


def _verify(word: str) -> list[str]:
    return ["test -f /work/answer.txt", f'test "$(cat /work/answer.txt)" = "{word}"']


def make_task(
    level: int, rng: random.Random, task_id: str, *, max_turns: int | None = None, note_extra: float = 0.0
) -> Task:
    """One task of ``level`` drawn from ``rng``; a level-2 note gets a second line with probability
    ``note_extra`` (drawn only when it is above 0, so the default task streams are unchanged)."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    if not 0.0 <= note_extra <= 1.0:
        raise ValueError(f"note_extra must be within [0, 1], got {note_extra}")
    word = rng.choice(WORDS)
    trailer = level == 2 and note_extra > 0 and rng.random() < note_extra
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
    if trailer:
        setup.append(f"printf '%s\\n' '{NOTE_TRAILER}' >> /work/note.txt")
    return Task(
        task_id=task_id,
        family=FAMILY,
        instruction=instruction,
        environment="base",
        setup=setup,
        verify=_verify(word),
        max_turns=max_turns if max_turns is not None else level + 3,
        difficulty=level,
        metadata={"level": str(level), "answer": word, "chain": " ".join(chain)}
        | ({"note_extra": "1"} if trailer else {}),
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


def task_at(seed: int, index: int, levels: Sequence[int], *, note_extra: float = 0.0) -> Task:
    """Task number ``index`` of the endless built-in stream (deterministic in seed and index)."""
    level = levels[index % len(levels)]
    rng = random.Random(f"{FAMILY}:{seed}:{index}")
    return make_task(level, rng, f"{FAMILY}-s{seed}-{index:06d}-L{level}", note_extra=note_extra)


async def make_tasks(
    sandbox: TaskSandbox, params: TaskParams, *, seed: int, start: int, count: int
) -> list[Task]:
    """Tasks ``start .. start+count-1`` of the stream of ``seed`` at ``params.levels`` with
    ``params.note_extra`` (no sandbox needed: the family's ``make_tasks`` hook)."""
    levels, extra = tuple(params.levels), params.note_extra
    return [task_at(seed, i, levels, note_extra=extra) for i in range(start, start + count)]


def solution_commands(task: Task) -> list[str]:
    """The bash commands of a correct solution (before ``submit``), from the task's metadata."""
    word = task.metadata["answer"]
    chain = task.metadata.get("chain", "").split()
    return [*(f"cat {f}" for f in chain), f"echo {word} > answer.txt"]
