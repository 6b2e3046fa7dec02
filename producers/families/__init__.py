"""Task families, one package each (``files``, ``gem``, and the importers ``harbor`` and ``swe``),
and the registry that finds them.

A task names its family in ``Task.family`` (``files``, ``gem:<env id>``); ``producer.source`` names
the family the producer streams (``builtin`` is ``files``). Tasks of no registered family (a JSONL
file's own) get the default tools.
"""

from __future__ import annotations

from pathlib import Path

from agent_harness.tools import ToolRegistry
from producers.families import harbor, swe
from producers.families.base import Family
from producers.families.files import FILES
from producers.families.gem import GEM
from producers.families.harbor import HARBOR
from producers.families.imported import Imported
from producers.families.swe import SWE
from schemas.task import Task

FAMILIES: dict[str, Family] = {f.name: f for f in (FILES, GEM, HARBOR, SWE)}


def get(name: str) -> Family:
    """The family called ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown task family {name!r}; families: {', '.join(FAMILIES)}") from None


def for_source(source: str) -> Family | None:
    """The family ``producer.source`` selects (None for a source that is no family: ``jsonl``)."""
    return next((f for f in FAMILIES.values() if f.source == source), None)


def of_task(task: Task) -> Family | None:
    """The family a task belongs to (the part of ``Task.family`` before the first ``:``)."""
    return FAMILIES.get(task.family.split(":", 1)[0])


def tools_for(task: Task) -> ToolRegistry:
    """The tools of a task's episode, from its family (default tools for tasks of none)."""
    family = of_task(task)
    return family.tools(task) if family is not None else ToolRegistry()


def import_tasks(path: Path) -> list[Imported]:
    """The tasks of ``path`` as imported (not yet built): a JSONL file of SWE-style instances, or a
    Harbor / Terminal-Bench task directory or folder of them."""
    path = Path(path)
    return swe.load(path) if path.is_file() else harbor.load(path)


__all__ = ["FAMILIES", "Family", "for_source", "get", "import_tasks", "of_task", "tools_for"]
