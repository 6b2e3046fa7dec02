"""JSONL task files: one ``Task`` per line, validated with errors that name the line and field.

Unknown keys are errors here (the wire record ``Task`` tolerates them for schema evolution, but in a
hand-written file a key like ``verfy`` is a typo that would silently drop the verifier).
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from schemas.task import Task


class TaskFileError(ValueError):
    """A task file that cannot be used, with the file, line and field at fault."""


_decoder = msgspec.json.Decoder(Task)
_FIELDS = tuple(f.name for f in msgspec.structs.fields(Task))
_AT = re.compile(r"\s*-\s*at `\$\.?([^`]*)`$")


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message with its ``at `$.field``` suffix turned into a leading field name."""
    msg = str(exc)
    where = _AT.search(msg)
    if where is None:
        return msg
    return f"field `{where.group(1)}`: {msg[: where.start()]}"


def _check_keys(line: bytes) -> str | None:
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None  # the typed decode below names the JSON error
    if not isinstance(obj, dict):
        return "expected a JSON object (one task per line)"
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        return f"unknown field `{unknown[0]}`; a task has the fields {', '.join(_FIELDS)}"
    return None


def load_jsonl(path: Path) -> list[Task]:
    """Every task of ``path``; the first bad line raises ``TaskFileError`` naming line and field."""
    if not path.exists():
        raise TaskFileError(f"task file {path} does not exist.")
    tasks: list[Task] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        problem = _check_keys(line)
        if problem is not None:
            raise TaskFileError(f"{path}:{lineno}: {problem}")
        try:
            task = _decoder.decode(line)
        except msgspec.ValidationError as exc:
            raise TaskFileError(f"{path}:{lineno}: {_explain(exc)}") from None
        except msgspec.DecodeError as exc:
            raise TaskFileError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if task.task_id in seen:
            raise TaskFileError(f"{path}:{lineno}: field `task_id`: duplicate task_id {task.task_id!r}")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{path}: holds no tasks.")
    return tasks
