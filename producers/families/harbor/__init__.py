"""The ``harbor`` family: Harbor / Terminal-Bench 2.0 task directories (``harbor2``) and the older
Terminal-Bench layout (``tb1``), as tasks for training (``producer.source = "harbor"``) and
evaluation (``rollstream eval``). ``load`` takes one task directory or a folder of them.

Episodes use the default tools (bash, submit) in the task's own image, with a writable root; the
verifier's files enter the sandbox only after the agent's last command. There is no scripted
expert: a task's reference solution is run by ``rollstream eval --agent oracle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent_harness.tools import default_tools
from producers.families.base import Family
from producers.families.harbor.harbor2 import load_harbor
from producers.families.harbor.tb1 import load_tb1
from producers.families.imported import Imported, ImportedStream, Problem, failed

FAMILY = "harbor"


def is_task_dir(path: Path) -> bool:
    return (path / "task.toml").is_file() or (path / "task.yaml").is_file()


def load_dir(root: Path) -> Imported:
    """One task directory, in whichever of the two layouts it is."""
    if (root / "task.toml").is_file():
        return load_harbor(root)
    if (root / "task.yaml").is_file():
        return load_tb1(root)
    problem = Problem(
        "task.toml", "", "not a task directory: it has neither task.toml (Harbor) nor task.yaml"
    )
    return failed(root.name, "harbor", root, [problem])


def load(path: Path) -> list[Imported]:
    """Every task of ``path``: a task directory, or a folder whose subdirectories are tasks (a
    subdirectory that is none is reported as such; hidden ones are skipped)."""
    path = Path(path)
    if not path.is_dir():
        return [failed(path.name, "harbor", path, [Problem(str(path), "", "no such directory")])]
    if is_task_dir(path):
        return [load_dir(path)]
    items = [load_dir(d) for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return items or [failed(path.name, "harbor", path, [Problem(str(path), "", "holds no task directories")])]


_stream = ImportedStream(load, "task")
prepared_tasks = _stream.prepared_tasks
make_tasks = _stream.make_tasks


def no_expert(**_: Any) -> Any:
    raise ValueError(
        "imported tasks have no scripted expert: set learner.warm_start_steps = 0 (or seed from a lake "
        "that already holds expert episodes with learner.seed_episodes = 0)"
    )


HARBOR = Family(
    name=FAMILY, source="harbor", make_tasks=make_tasks, tools=default_tools, expert=no_expert, batch=16
)

__all__ = ["FAMILY", "HARBOR", "is_task_dir", "load", "load_dir", "load_harbor", "load_tb1", "prepared_tasks"]
