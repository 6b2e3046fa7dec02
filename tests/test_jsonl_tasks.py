"""JSONL task files: good files load; a broken one is refused with the line and field at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producers.jsonl import TaskFileError, load_jsonl

GOOD = {
    "task_id": "t1",
    "family": "shell",
    "instruction": "Write the word apple to answer.txt",
    "setup": ["true"],
    "verify": ['test "$(cat answer.txt)" = "apple"'],
    "group_size": 4,
    "metadata": {"level": "1"},
}


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_good_file_loads_every_task_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    second = json.dumps(GOOD | {"task_id": "t2", "environment": "python"})
    tasks = load_jsonl(_file(tmp_path, "# tasks", json.dumps(GOOD), "", second))
    assert [t.task_id for t in tasks] == ["t1", "t2"]
    assert tasks[0].verify == GOOD["verify"] and tasks[0].group_size == 4
    assert tasks[1].environment == "python"


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (json.dumps(GOOD | {"instruction": 5}), ":3: field `instruction`: Expected `str`, got `int`"),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "family"}),
            ":3: Object missing required field `family`",
        ),
        (json.dumps(GOOD | {"group_size": 0}), ":3: field `group_size`: Expected `int` >= 1"),
        (json.dumps(GOOD | {"verfy": ["true"]}), ":3: unknown field `verfy`; a task has the fields task_id"),
        (json.dumps(GOOD | {"setup": "make"}), ":3: field `setup`: Expected `array`, got `str`"),
        ('{"task_id": "t3", "family": ', ":3: not valid JSON"),
        ("[1, 2]", ":3: expected a JSON object"),
        (json.dumps(GOOD), ":3: field `task_id`: duplicate task_id 't1'"),
    ],
)
def test_a_broken_line_is_refused_with_its_line_and_field(
    tmp_path: Path, bad_line: str, expected: str
) -> None:
    path = _file(tmp_path, json.dumps(GOOD), "# next", bad_line)
    with pytest.raises(TaskFileError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)


def test_a_missing_or_empty_file_is_refused_in_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TaskFileError, match="holds no tasks"):
        load_jsonl(_file(tmp_path, "# only a comment"))
