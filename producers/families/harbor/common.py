"""Checks both task-directory formats share: numbers in the config, the instruction, compose files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from producers.families.imported import Problem

COMPOSE_FILES = ("docker-compose.yaml", "docker-compose.yml", "compose.yaml")


def number(section: dict[str, Any], key: str, default: float, problems: list[Problem], where: str) -> float:
    """A positive number from a config table, or ``default``; a bad value is a problem naming it."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        file = "task.toml" if where in ("verifier", "agent", "environment", "solution") else "task.yaml"
        field = f"{where}.{key}" if file == "task.toml" else key
        problems.append(Problem(file, field, f"must be a positive number, got {value!r}"))
        return default
    return float(value)


def read_instruction(path: Path, file: str, problems: list[Problem]) -> str:
    """The non-empty text of an instruction file, or "" with a problem."""
    if not path.is_file():
        problems.append(Problem(file, "", "missing: the agent's instruction"))
        return ""
    text = path.read_text(errors="replace").strip()
    if not text:
        problems.append(Problem(file, "", "is empty"))
    return text


def compose_problem(directory: Path, prefix: str = "") -> Problem | None:
    """A problem when a compose file defines more than one service: multi-container tasks are not
    supported. A single-service compose file (Terminal-Bench's boilerplate) is ignored."""
    for name in COMPOSE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            doc = yaml.safe_load(path.read_text(errors="replace")) or {}
        except yaml.YAMLError as exc:
            return Problem(prefix + name, "", f"not valid YAML: {exc}")
        services = doc.get("services", {}) if isinstance(doc, dict) else {}
        if isinstance(services, dict) and len(services) > 1:
            return Problem(
                prefix + name,
                "services",
                f"defines {len(services)} services ({', '.join(services)}): "
                "multi-container tasks are not supported",
            )
    return None
