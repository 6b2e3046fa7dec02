"""The built-in ``files`` task family: determinism, levels, and commands that verify in a real sandbox."""

from __future__ import annotations

import msgspec
import pytest

from producers.families.files import FAMILY, WORDS, builtin_tasks, solution_commands
from sandboxd.client import SandboxClient
from schemas.task import Task
from tests.factories import passes, run_concurrently


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


async def _verifies(sandbox: SandboxClient, task: Task, commands: list[str]) -> bool:
    """Set the task up in a fresh sandbox, run ``commands``, and run the task's verify commands."""
    sid = (await sandbox.create(task.environment)).sandbox_id
    try:
        assert await passes(sandbox, sid, task.setup)
        for c in commands:
            await sandbox.exec(sid, c)
        return await passes(sandbox, sid, task.verify)
    finally:
        await sandbox.close(sid)


@pytest.mark.docker
@pytest.mark.parametrize("level", [1, 2, 3, 4])
async def test_the_solution_passes_verification_and_a_wrong_word_fails(
    sandbox_client: SandboxClient, level: int
) -> None:
    [task] = builtin_tasks(seed=level, count=1, levels=(level,))
    cases = [solution_commands(task), ["echo wrong > answer.txt"], []]
    verdicts = await run_concurrently([lambda c=c: _verifies(sandbox_client, task, c) for c in cases])
    assert verdicts == [True, False, False]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        builtin_tasks(seed=0, count=1, levels=())
    with pytest.raises(ValueError):
        builtin_tasks(seed=0, count=1, levels=(0,))
