"""The built-in ``files`` task family: determinism, levels, and commands that verify."""

from __future__ import annotations

import msgspec
import pytest

from producers.builtin import FAMILY, WORDS, builtin_tasks, solution_commands
from schemas.task import Task
from tests.test_harness_fixtures import FakeSandbox


def test_the_same_seed_gives_the_same_tasks_and_another_seed_differs() -> None:
    a, b = builtin_tasks(seed=3, count=30), builtin_tasks(seed=3, count=30)
    assert msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)
    assert [t.metadata for t in builtin_tasks(seed=4, count=30)] != [t.metadata for t in a]
    assert len({t.task_id for t in a}) == 30


def test_levels_cycle_and_need_level_many_tool_calls() -> None:
    tasks = builtin_tasks(seed=0, count=8, levels=(1, 2, 3, 4))
    assert [t.difficulty for t in tasks] == [1, 2, 3, 4] * 2
    for t in tasks:
        assert t.family == FAMILY and t.environment == "base"
        assert len(solution_commands(t)) == t.difficulty
        assert t.max_turns > t.difficulty  # room for the calls and submit
        assert t.metadata["answer"] in WORDS
        msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=Task)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
async def test_the_solution_passes_verification_and_a_wrong_word_fails(level: int) -> None:
    [task] = builtin_tasks(seed=level, count=1, levels=(level,))
    for commands, expect in [
        (solution_commands(task), True),
        (["echo wrong > answer.txt"], False),
        ([], False),
    ]:
        sandbox = FakeSandbox()
        sid = (await sandbox.create()).sandbox_id
        for c in [*task.setup, *commands]:
            await sandbox.exec(sid, c)
        codes = [(await sandbox.exec(sid, c)).exit_code for c in task.verify]
        assert (codes == [0] * len(codes)) is expect


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        builtin_tasks(seed=0, count=1, levels=())
    with pytest.raises(ValueError):
        builtin_tasks(seed=0, count=1, levels=(0,))
