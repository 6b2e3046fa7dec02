"""The agent loop against a fake sandbox: outcomes, chunk records and exact token accounting."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
from transformers import AutoTokenizer

from agent_harness.engine import Generation, GenRequest
from agent_harness.expert import ScriptedExpert
from agent_harness.loop import run_episode
from agent_harness.prompt import encode
from agent_harness.settings import HarnessSettings
from agent_harness.tools import format_tool_call
from agent_harness.torch_engine import TorchEngine
from producers.builtin import builtin_tasks
from schemas.arrays import unpack_logprobs
from schemas.task import TaskSample
from tests.test_harness_fixtures import (  # noqa: F401
    FakeSandbox,
    RecordingEngine,
    assert_exact_accounting,
    sequence_of,
    tiny_policy,
)

SETTINGS = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=700, max_observation_tokens=32)


async def _verified(sandbox: FakeSandbox, sandbox_id: str, verify: list[str]) -> bool:
    return all([(await sandbox.exec(sandbox_id, c)).exit_code == 0 for c in verify])


async def test_the_expert_solves_built_in_tasks_with_exact_accounting(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    sandbox = FakeSandbox()
    solved = 0
    tasks = builtin_tasks(seed=0, count=12, levels=(1, 2, 3, 4))
    for i, task in enumerate(tasks):
        expert = RecordingEngine(ScriptedExpert(tokenizer=tok, error_rate=0.0, seed=i, version=3))
        traj = await run_episode(
            TaskSample(run="r", task=task), engine=expert, sandbox=sandbox, settings=SETTINGS, source="expert"
        )
        assert traj.status == "completed", traj.abort_reason
        assert traj.source == "expert" and traj.traj_id == f"r:{task.task_id}:0"
        assert traj.min_version == traj.max_version == 3
        assert len(traj.chunks) == int(task.metadata["level"]) + 1
        assert [c.tool_name for c in traj.chunks][-1] == "submit"
        assert all(c.tool_status == "ok" for c in traj.chunks)
        assert all(not unpack_logprobs(c.action_logprobs).any() for c in traj.chunks)
        assert traj.chunks[-1].obs_tokens == b""
        assert_exact_accounting(traj, expert.calls)
        assert sandbox.closed == []  # the reward worker closes it
        solved += await _verified(sandbox, traj.sandbox_id, task.verify)
    assert solved == len(tasks)


async def test_expert_mistakes_fail_verification_about_as_often_as_asked(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    sandbox = FakeSandbox()
    expert = ScriptedExpert(tokenizer=tok, error_rate=0.5, seed=11)
    results = []
    statuses = set()
    for task in builtin_tasks(seed=4, count=40):
        traj = await run_episode(
            TaskSample(run="r", task=task), engine=expert, sandbox=sandbox, settings=SETTINGS
        )
        statuses |= {c.tool_status for c in traj.chunks}
        results.append(await _verified(sandbox, traj.sandbox_id, task.verify))
    failures = results.count(False)
    assert 8 <= failures <= 30, failures
    assert "parse_error" in statuses


class FuzzEngine:
    """Emits a random mix of good calls, malformed calls, unknown tools, rambling and answers."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tokenizer, self.version, self.rng = tokenizer, 0, random.Random(seed)

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        out = []
        for r in requests:
            text = self.rng.choice(
                [
                    format_tool_call(
                        "bash", {"command": self.rng.choice(["cat note.txt", "ls", "yes", "sleep 100"])}
                    ),
                    format_tool_call("python", {"code": "1"}),
                    '<tool_call>{"name": "bash", "arg',
                    '<tool_call>{"name": "bash"}<|im_end|>',
                    "hmm " * self.rng.randint(1, 80),
                    "The answer is apple.<|im_end|>",
                    format_tool_call("submit", {"answer": "apple"}),
                ]
            )
            ids = encode(self.tokenizer, text)
            stops = set(r.stop_token_ids or ())
            cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            finish = "stop" if cut < len(ids) or (ids and ids[cut - 1] in stops) else "length"
            ids = ids[: min(cut, r.max_new_tokens)]
            if len(ids) == r.max_new_tokens and not (ids and ids[-1] in stops):
                finish = "length"
            out.append(Generation(ids, [-1.0] * len(ids), finish))  # type: ignore[arg-type]
        return out

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self.version = version


async def test_accounting_is_exact_for_every_kind_of_ending(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    sandbox = FakeSandbox()
    settings = HarnessSettings(max_new_tokens_per_turn=40, max_total_tokens=400, max_observation_tokens=24)
    seen_status, seen_tool = set(), set()
    for i, task in enumerate(builtin_tasks(seed=9, count=120)):
        engine = RecordingEngine(FuzzEngine(tok, seed=i))
        traj = await run_episode(
            TaskSample(run="fz", task=task, sample_idx=i), engine=engine, sandbox=sandbox, settings=settings
        )
        assert_exact_accounting(traj, engine.calls)
        assert len(sequence_of(traj)) <= settings.max_total_tokens
        seen_status.add(traj.status)
        seen_tool |= {c.tool_status for c in traj.chunks}
        for c in traj.chunks:
            assert len(unpack_logprobs(c.action_logprobs)) * 4 == len(c.action_tokens)
    assert seen_status == {"completed", "truncated"}
    assert seen_tool == {"ok", "error", "timeout", "parse_error", "none"}


async def test_random_policy_episodes_account_exactly(tiny_policy: Path) -> None:  # noqa: F811
    engine = TorchEngine(tiny_policy, seed=0)
    sandbox = FakeSandbox()
    settings = HarnessSettings(max_new_tokens_per_turn=24, max_total_tokens=260)
    statuses = []
    for i, task in enumerate(builtin_tasks(seed=1, count=6)):
        rec = RecordingEngine(engine)
        traj = await run_episode(
            TaskSample(run="rnd", task=task, sample_idx=i), engine=rec, sandbox=sandbox, settings=settings
        )
        assert_exact_accounting(traj, rec.calls)
        statuses.append(traj.status)
        assert all(c.tool_status in ("parse_error", "none") for c in traj.chunks)
        assert all((unpack_logprobs(c.action_logprobs) < 0).all() for c in traj.chunks)
    assert "truncated" in statuses


async def test_versions_are_stamped_per_chunk_when_weights_move_between_turns(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    expert = ScriptedExpert(tokenizer=tok, error_rate=0.0, seed=0, version=1)

    async def bump() -> None:
        await expert.load_weights(b"", expert.version + 1)

    task = builtin_tasks(seed=2, count=3)[2]  # level 3: four chunks
    traj = await run_episode(
        TaskSample(run="v", task=task),
        engine=expert,
        sandbox=FakeSandbox(),
        settings=SETTINGS,
        before_turn=bump,
    )
    assert [c.policy_version for c in traj.chunks] == [2, 3, 4, 5]
    assert (traj.min_version, traj.max_version) == (2, 5)


async def test_sandbox_failures_abort_the_episode_instead_of_raising(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    task = builtin_tasks(seed=2, count=3)[2]
    for sandbox, where in [
        (FakeSandbox(fail_create=True), "create"),
        (FakeSandbox(fail_on_exec=1), "exec"),
        (FakeSandbox(fail_on_exec=4), "exec"),
    ]:
        expert = RecordingEngine(ScriptedExpert(tokenizer=tok, error_rate=0.0, seed=0))
        traj = await run_episode(
            TaskSample(run="a", task=task), engine=expert, sandbox=sandbox, settings=SETTINGS
        )
        assert traj.status == "aborted"
        assert (
            where in traj.abort_reason and "vanished" in traj.abort_reason
        ) or "no sandboxd" in traj.abort_reason
        assert_exact_accounting(traj, expert.calls)


async def test_max_turns_and_episode_timeout_truncate(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    task = builtin_tasks(seed=2, count=3)[2].__class__(
        **{**_fields(builtin_tasks(seed=2, count=3)[2]), "max_turns": 2}
    )
    expert = RecordingEngine(ScriptedExpert(tokenizer=tok, error_rate=0.0, seed=0))
    traj = await run_episode(
        TaskSample(run="t", task=task), engine=expert, sandbox=FakeSandbox(), settings=SETTINGS
    )
    assert traj.status == "truncated" and len(traj.chunks) == 2
    assert traj.chunks[-1].obs_tokens == b"" and traj.chunks[-1].obs_text  # text kept, tokens not fed
    assert_exact_accounting(traj, expert.calls)

    class Slow(ScriptedExpert):
        async def generate(self, requests: list[GenRequest]) -> list[Generation]:
            await anyio.sleep(0.3)
            return await super().generate(requests)

    slow = Slow(tokenizer=tok, error_rate=0.0, seed=0)
    settings = HarnessSettings(episode_timeout_s=0.5)
    traj = await run_episode(
        TaskSample(run="t", task=task), engine=slow, sandbox=FakeSandbox(), settings=settings
    )
    assert traj.status == "truncated" and traj.abort_reason == "episode_timeout"
    assert len(traj.chunks) == 1 and traj.chunks[0].obs_tokens == b""


async def test_prefix_calls_are_replayed_into_the_prompt(tiny_policy: Path) -> None:  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    task = builtin_tasks(seed=2, count=3)[2]
    first = format_tool_call("bash", {"command": task.metadata["chain"].split()[0].join(["cat ", ""])})
    expert = RecordingEngine(ScriptedExpert(tokenizer=tok, error_rate=0.0, seed=0))
    sandbox = FakeSandbox()
    traj = await run_episode(
        TaskSample(run="p", task=task, prefix_calls=[first]),
        engine=expert,
        sandbox=sandbox,
        settings=SETTINGS,
    )
    assert traj.status == "completed" and len(traj.chunks) == 3
    assert first in tok.decode(list(unpack_tokens_(traj.prompt_tokens)), skip_special_tokens=False)
    assert_exact_accounting(traj, expert.calls)
    assert await _verified(sandbox, traj.sandbox_id, task.verify)


def unpack_tokens_(raw: bytes) -> list[int]:
    from schemas.arrays import unpack_tokens

    return [int(t) for t in unpack_tokens(raw)]


def _fields(task: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.structs.asdict(task)
