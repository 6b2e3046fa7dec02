"""The built-in ``files`` family: small file-and-word puzzles solved and verified in a real sandbox.

``tasks`` makes them (and knows their solutions), ``expert`` plays them by script, ``corpus`` is the
text the default policy's tokenizer is trained on. Episodes use the default tools (bash, submit).
"""

from __future__ import annotations

from agent_harness.tools import default_tools
from producers.families.base import Family
from producers.families.files.corpus import corpus
from producers.families.files.expert import FilesExpert
from producers.families.files.tasks import (
    FAMILY,
    WORDS,
    builtin_tasks,
    make_tasks,
    solution_commands,
    task_at,
)

FILES = Family(
    name=FAMILY,
    source="builtin",
    make_tasks=make_tasks,
    tools=default_tools,
    expert=FilesExpert,
    corpus=corpus,
)

__all__ = [
    "FAMILY",
    "FILES",
    "WORDS",
    "FilesExpert",
    "builtin_tasks",
    "corpus",
    "solution_commands",
    "task_at",
]
