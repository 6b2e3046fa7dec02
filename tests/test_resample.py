"""Chunk-level resampling: tasks restarting a lake trajectory at chunk K, run in a real sandbox."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from agent_harness.loop import run_episode
from agent_harness.tools import format_tool_call
from consumers.lake import LakeWriter
from producers.families.files import FilesExpert, solution_commands
from producers.resample import ResampleError, prefix_calls, resample
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_tokens
from schemas.codec import tasks_decoder
from schemas.task import TaskSample
from streams.tasks import lookup
from streams.topology import TASKS, ensure, subject
from tests.factories import (
    EXPERT_SETTINGS,
    RecordingEngine,
    assert_exact_accounting,
    expert_trajectory,
    lake_trajectory,
)

RUN = "rs"
SETTINGS = EXPERT_SETTINGS  # the source episode's budget, the resampled one's too


async def pull_tasks(js: JetStreamContext, n: int) -> list[TaskSample]:
    sub = await js.pull_subscribe(subject("tasks", RUN), stream=TASKS.name)
    got: list[TaskSample] = []
    with anyio.move_on_after(10):
        while len(got) < n:
            for m in await sub.fetch(n, timeout=2):
                got.append(tasks_decoder.decode(m.data))
                await m.ack()
    return got


async def test_resampled_tasks_carry_the_first_k_calls_and_the_episode_starts_after_them(
    js: JetStreamContext,
    sandbox_client: SandboxClient,
    tiny_policy: Path,
    tmp_path: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    source = await expert_trajectory(tok, sandbox_client)
    writer = LakeWriter(tmp_path, writer_id="seed")
    writer.add_scored(source)
    writer.flush()
    await ensure(js, RUN)

    result = await resample(
        js, tmp_path, "SELECT traj_id FROM trajectories WHERE reward > 0", run=RUN, from_chunk=2, samples=2
    )
    assert (result.published, result.trajectories, result.skipped) == (2, 1, {})
    samples = await pull_tasks(js, 2)
    assert [s.sample_idx for s in samples] == [0, 1]
    task = source.traj.task
    assert task is not None
    cat_start, cat_next, write_answer = solution_commands(task)
    expected = [format_tool_call("bash", {"command": c}) for c in (cat_start, cat_next)]
    for sample in samples:
        assert sample.run == RUN and sample.prefix_calls == expected
        assert sample.task.task_id != task.task_id and sample.task.setup == task.setup
        assert sample.task.metadata["resampled_from"] == source.traj.traj_id
        assert sample.task.metadata["from_chunk"] == "2"
    assert samples[0].group_id == samples[1].group_id
    # the new task is in the registry before its samples: the reward group verifies with that copy
    assert await lookup(js, RUN, samples[0].task.task_id) == samples[0].task

    # The harness re-executes the two calls in a fresh sandbox and the policy starts at chunk 2:
    # the expert can only write the right word if the second file's real content is in its prompt.
    expert = RecordingEngine(FilesExpert(tokenizer=tok, error_rate=0.0, seed=2))
    traj = await run_episode(samples[0], engine=expert, sandbox=sandbox_client, settings=SETTINGS)
    try:
        assert traj.status == "completed", traj.abort_reason
        assert [(c.tool_name, c.tool_args) for c in traj.chunks] == [
            ("bash", msgspec.json.encode({"command": write_answer}).decode()),
            ("submit", msgspec.json.encode({"answer": task.metadata["answer"]}).decode()),
        ]
        prompt = tok.decode([int(t) for t in unpack_tokens(traj.prompt_tokens)], skip_special_tokens=False)
        assert all(call in prompt for call in expected) and task.metadata["answer"] in prompt
        assert_exact_accounting(traj, expert.calls)
        for command in task.verify:
            assert (await sandbox_client.exec(traj.sandbox_id, command)).exit_code == 0
    finally:
        await sandbox_client.close(traj.sandbox_id)


def test_a_trajectory_cannot_restart_at_or_past_its_end_or_across_a_parse_error(tmp_path: Path) -> None:
    scored = lake_trajectory(1)  # three bash chunks
    assert len(prefix_calls(scored, 2)) == 2
    with pytest.raises(ResampleError, match="no chunk 3"):
        prefix_calls(scored, 3)
    garbled = msgspec.structs.replace(scored.traj.chunks[0], tool_status="parse_error", tool_name="")
    broken = msgspec.structs.replace(scored.traj, chunks=[garbled, *scored.traj.chunks[1:]])
    with pytest.raises(ResampleError, match="chunk 0 has no well-formed tool call"):
        prefix_calls(msgspec.structs.replace(scored, traj=broken), 1)
