"""JSONL task files: one ``Task`` per line, validated with errors that name the line and field."""

from __future__ import annotations

from pathlib import Path

import msgspec

from schemas.task import Task


class TaskFileError(ValueError):
    """A task file that cannot be used, with the file, line and field at fault."""


_decoder = msgspec.json.Decoder(Task)


def load_jsonl(path: Path) -> list[Task]:
    """Every task of ``path``; the first bad line raises ``TaskFileError`` naming line and field."""
    if not path.exists():
        raise TaskFileError(f"task file {path} does not exist.")
    tasks: list[Task] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        try:
            task = _decoder.decode(line)
        except msgspec.ValidationError as exc:
            raise TaskFileError(f"{path}:{lineno}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise TaskFileError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if task.task_id in seen:
            raise TaskFileError(f"{path}:{lineno}: duplicate task_id {task.task_id!r}")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{path}: holds no tasks.")
    return tasks
