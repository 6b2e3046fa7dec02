"""The agent loop in real sandboxes (real sandboxd on a real nats-server, real Docker)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from transformers import AutoTokenizer

from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from agent_harness.torch_engine import TorchEngine
from producers.families.files import FilesExpert, builtin_tasks
from sandboxd.client import SandboxClient
from schemas.task import TaskSample
from tests.factories import RecordingEngine, assert_exact_accounting

pytestmark = pytest.mark.docker

SETTINGS = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=600, command_timeout_s=5.0)


async def _verify(client: SandboxClient, sandbox_id: str, commands: list[str]) -> list[int]:
    return [(await client.exec(sandbox_id, c)).exit_code for c in commands]


async def test_expert_episodes_solve_tasks_in_real_sandboxes(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    for i, task in enumerate(builtin_tasks(seed=5, count=3)):  # levels 1, 2, 3
        expert = RecordingEngine(FilesExpert(tokenizer=tok, error_rate=0.0, seed=i))
        traj = await run_episode(
            TaskSample(run="it", task=task),
            engine=expert,
            sandbox=sandbox_client,
            settings=SETTINGS,
            source="expert",
        )
        try:
            assert traj.status == "completed", traj.abort_reason
            assert traj.sandbox_id and traj.sandbox_owner
            assert len(traj.chunks) == int(task.metadata["level"]) + 1
            assert_exact_accounting(traj, expert.calls)
            assert await _verify(sandbox_client, traj.sandbox_id, task.verify) == [0] * len(task.verify)
        finally:
            with anyio.move_on_after(30, shield=True):
                await sandbox_client.close(traj.sandbox_id)


async def test_random_policy_and_a_wrong_answer_fail_verification_in_a_real_sandbox(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    task = builtin_tasks(seed=6, count=2)[1]
    engine = RecordingEngine(TorchEngine(tiny_policy, seed=0))
    settings = HarnessSettings(max_new_tokens_per_turn=16, max_total_tokens=260)
    traj = await run_episode(
        TaskSample(run="it", task=task), engine=engine, sandbox=sandbox_client, settings=settings
    )
    try:
        assert traj.status in ("truncated", "completed")
        assert_exact_accounting(traj, engine.calls)
        codes = await _verify(sandbox_client, traj.sandbox_id, task.verify)
        assert codes != [0] * len(codes)
    finally:
        with anyio.move_on_after(30, shield=True):
            await sandbox_client.close(traj.sandbox_id)


async def test_a_sandbox_closed_under_the_episode_aborts_it(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    expert = FilesExpert(tokenizer=tok, error_rate=0.0, seed=0)
    created: list[str] = []

    class Closing:
        """Closes the sandbox just before the policy's first command runs."""

        async def create(self, environment: str = "base", **kw: object):  # type: ignore[no-untyped-def]
            c = await sandbox_client.create(environment, **kw)  # type: ignore[arg-type]
            created.append(c.sandbox_id)
            return c

        async def exec(self, sandbox_id: str, command: str, **kw: object):  # type: ignore[no-untyped-def]
            if not command.startswith("printf"):
                await sandbox_client.close(sandbox_id)
            return await sandbox_client.exec(sandbox_id, command, **kw)  # type: ignore[arg-type]

        async def close(self, sandbox_id: str) -> None:
            await sandbox_client.close(sandbox_id)

    task = builtin_tasks(seed=6, count=2)[1]
    traj = await run_episode(
        TaskSample(run="it", task=task), engine=expert, sandbox=Closing(), settings=SETTINGS
    )
    assert traj.status == "aborted" and traj.abort_reason.startswith("exec failed")
    assert traj.sandbox_id == created[0]


async def test_an_episode_waits_for_a_sandbox_slot_instead_of_aborting_when_sandboxd_is_full(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    # sandboxd at capacity (its sandboxes wait for verification) is back-pressure, not a failure
    held = [(await sandbox_client.create()).sandbox_id for _ in range(3)]  # the test daemon holds 3
    task = builtin_tasks(seed=5, count=1, levels=(1,))[0]
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    expert = FilesExpert(tokenizer=tok, error_rate=0.0, seed=0)

    async def free_a_slot_later() -> None:
        await anyio.sleep(1.5)
        await sandbox_client.close(held.pop())

    async with anyio.create_task_group() as tg:
        tg.start_soon(free_a_slot_later)
        started = anyio.current_time()
        traj = await run_episode(TaskSample(run="it", task=task), engine=expert, sandbox=sandbox_client,
                                 settings=SETTINGS, source="expert")  # fmt: skip
    try:
        assert traj.status == "completed", traj.abort_reason
        assert anyio.current_time() - started >= 1.5  # it waited for the slot
    finally:
        with anyio.move_on_after(30, shield=True):
            for sid in [*held, traj.sandbox_id]:
                await sandbox_client.close(sid)
    short = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=600, sandbox_wait_s=0.5)
    blockers = [(await sandbox_client.create()).sandbox_id for _ in range(3)]
    try:
        aborted = await run_episode(
            TaskSample(run="it", task=task, sample_idx=1), engine=expert, sandbox=sandbox_client,
            settings=short, source="expert",
        )  # fmt: skip
        assert aborted.status == "aborted" and "SandboxCapacity" in aborted.abort_reason
    finally:
        with anyio.move_on_after(30, shield=True):
            for sid in blockers:
                await sandbox_client.close(sid)


async def test_a_long_note_defeats_the_experts_blind_copy_but_not_reading_it(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    """``producer.note_extra`` / ``expert_shortcut``: ``cp note.txt answer.txt`` solves a level-2 task
    whose note holds only the word and fails one with a second line; reading the note and writing
    its word solves both (the family where imitation of the expert's successes is not enough)."""
    from producers.families.files.expert import SHORTCUT
    from producers.families.files.tasks import task_at

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tasks = [task_at(3, i, (2,), note_extra=0.5) for i in range(12)]
    long_notes = [t for t in tasks if t.metadata.get("note_extra") == "1"]
    short_notes = [t for t in tasks if "note_extra" not in t.metadata]
    assert long_notes and short_notes  # both kinds at 0.5
    assert task_at(3, 0, (2,)) == task_at(3, 0, (2,), note_extra=0.0)  # the default stream is unchanged
    for task, shortcut, solved in [
        (long_notes[0], 1.0, False),
        (short_notes[0], 1.0, True),
        (long_notes[0], 0.0, True),
    ]:
        expert = RecordingEngine(FilesExpert(tokenizer=tok, error_rate=0.0, seed=1, shortcut=shortcut))
        traj = await run_episode(
            TaskSample(run="it", task=task), engine=expert, sandbox=sandbox_client, settings=SETTINGS
        )
        try:
            assert traj.status == "completed", traj.abort_reason
            first = traj.chunks[0].tool_args
            assert (SHORTCUT in first) == (shortcut == 1.0), first
            codes = await _verify(sandbox_client, traj.sandbox_id, task.verify)
            assert (codes == [0] * len(codes)) == solved, (task.metadata, first, codes)
        finally:
            with anyio.move_on_after(30, shield=True):
                await sandbox_client.close(traj.sandbox_id)
