"""The older Terminal-Bench task layout (before Harbor).

::

    <task>/task.yaml        instruction (or descriptions[key=base].description), max_agent_timeout_sec,
                            max_test_timeout_sec, author_*, difficulty, category, tags, parser_name
    <task>/Dockerfile       built with the task directory as context, minus the test and solution files
    <task>/run-tests.sh     copied with tests/ to /tests ($TEST_DIR) after the agent's last command
    <task>/tests/           the test files
    <task>/solution.sh      the reference solution (or solution.yaml: a list of {command: ...})

The verifier runs ``bash /tests/run-tests.sh`` with ``TEST_DIR=/tests``; its exit code stands in
for Terminal-Bench's pytest parser (pytest exits non-zero when a test fails), unless it writes a
reward file as Harbor tasks do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from producers.families.harbor.common import compose_problem, number
from producers.families.imported import (
    MAX_TURNS,
    EnvSource,
    Imported,
    Problem,
    failed,
    files_under,
    meta_strings,
    size_problem,
)
from schemas.task import Oracle, Task, TaskResources, Verifier

FAMILY = "harbor"
# Never part of the image's build context: what the agent must not see.
HIDDEN = ("tests", "run-tests.sh", "solution.sh", "solution.yaml", "task.yaml")
META_KEYS = ("author_name", "author_email", "difficulty", "category", "tags", "parser_name")


def _instruction(doc: dict[str, Any], problems: list[Problem]) -> str:
    text = doc.get("instruction")
    if text is None:  # the oldest layout: descriptions: [{key: base, description: ...}]
        for entry in doc.get("descriptions") or []:
            if isinstance(entry, dict) and entry.get("key", "base") == "base":
                text = entry.get("description")
    if not isinstance(text, str) or not text.strip():
        problems.append(Problem("task.yaml", "instruction", "missing or empty: the agent's instruction"))
        return ""
    return text.strip()


def _solution(root: Path, timeout_s: float, problems: list[Problem]) -> Oracle | None:
    if (root / "solution.sh").is_file():
        files = {"/solution/solution.sh": (root / "solution.sh").read_bytes()}
        return Oracle(command="bash /solution/solution.sh", files=files, timeout_s=timeout_s)
    if (root / "solution.yaml").is_file():
        try:
            steps = yaml.safe_load((root / "solution.yaml").read_text(errors="replace")) or []
        except yaml.YAMLError as exc:
            problems.append(Problem("solution.yaml", "", f"not valid YAML: {exc}"))
            return None
        commands = [s.get("command") for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []
        if not commands or not all(isinstance(c, str) for c in commands):
            problems.append(Problem("solution.yaml", "command", "must be a list of {command: <shell text>}"))
            return None
        script = "\n".join(str(c) for c in commands).encode() + b"\n"
        return Oracle(
            command="bash /solution/solution.sh", files={"/solution/solution.sh": script}, timeout_s=timeout_s
        )
    problems.append(
        Problem("solution.sh", "", "missing: no reference solution to check the task with", "warning")
    )
    return None


def _verifier(root: Path, timeout_s: float, problems: list[Problem]) -> Verifier | None:
    if not (root / "run-tests.sh").is_file():
        problems.append(Problem("run-tests.sh", "", "missing: the verifier runs `bash /tests/run-tests.sh`"))
        return None
    files = {"/tests/run-tests.sh": (root / "run-tests.sh").read_bytes()}
    if (root / "tests").is_dir():
        files |= {dst: src.read_bytes() for dst, src in files_under(root / "tests", "/tests")}
    return Verifier(
        command="bash /tests/run-tests.sh", files=files, timeout_s=timeout_s, env={"TEST_DIR": "/tests"}
    )


def load_tb1(root: Path) -> Imported:
    """One old-layout Terminal-Bench task directory: the task, or the problems that keep it out."""
    name = root.name
    problems: list[Problem] = []
    try:
        doc = yaml.safe_load((root / "task.yaml").read_text(errors="replace")) or {}
    except yaml.YAMLError as exc:
        return failed(name, "terminal-bench", root, [Problem("task.yaml", "", f"not valid YAML: {exc}")])
    if not isinstance(doc, dict):
        return failed(name, "terminal-bench", root, [Problem("task.yaml", "", "must be a mapping")])
    instruction = _instruction(doc, problems)
    agent_timeout = number(doc, "max_agent_timeout_sec", 180.0, problems, "task.yaml")
    verifier = _verifier(root, number(doc, "max_test_timeout_sec", 30.0, problems, "task.yaml"), problems)
    oracle = _solution(root, agent_timeout, problems)
    if not (root / "Dockerfile").is_file():
        problems.append(Problem("Dockerfile", "", "missing: the task's environment"))
    if (compose := compose_problem(root)) is not None:
        problems.append(compose)
    if any(p.severity == "error" for p in problems) or verifier is None:
        return failed(name, "terminal-bench", root, problems)
    task = Task(
        task_id=name,
        family=FAMILY,
        instruction=instruction,
        resources=TaskResources(writable_root=True),
        agent_timeout_s=agent_timeout,
        max_turns=MAX_TURNS,
        verifier=verifier,
        oracle=oracle,
        metadata=meta_strings({k: doc[k] for k in META_KEYS if k in doc}) | {"format": "terminal-bench"},
    )
    if (too_big := size_problem(task, "tests/")) is not None:
        return failed(name, "terminal-bench", root, [*problems, too_big])
    env = EnvSource(dockerfile=root / "Dockerfile", context=root, exclude=HIDDEN)
    return Imported(name=name, format="terminal-bench", path=root, task=task, env=env, problems=problems)
