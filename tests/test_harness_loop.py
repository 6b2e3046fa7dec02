"""The agent loop in real sandboxes (real sandboxd, real Docker): outcomes, chunk records and exact
token accounting."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from transformers import AutoTokenizer

from agent_harness.batcher import Batcher
from agent_harness.engine import Generation, GenRequest
from agent_harness.loop import run_episode
from agent_harness.prompt import encode
from agent_harness.settings import HarnessSettings
from agent_harness.tools import format_tool_call
from agent_harness.torch_engine import TorchEngine
from producers.families.files import FilesExpert, builtin_tasks
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.task import Task, TaskSample
from schemas.trajectory import Trajectory
from tests.factories import (
    RecordingEngine,
    assert_exact_accounting,
    remove_container,
    run_concurrently,
    sequence_of,
    verified_episode,
)

SETTINGS = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=700, max_observation_tokens=32)


def _expert(policy: Path, seed: int = 0, *, error_rate: float = 0.0, version: int = 0) -> FilesExpert:
    tok = AutoTokenizer.from_pretrained(policy)
    return FilesExpert(tokenizer=tok, error_rate=error_rate, seed=seed, version=version)


def _level3(**changes: Any) -> Task:
    return msgspec.structs.replace(builtin_tasks(seed=2, count=3)[2], **changes)  # four chunks


@pytest.mark.docker
async def test_the_expert_solves_built_in_tasks_with_exact_accounting(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tasks = builtin_tasks(seed=0, count=8, levels=(1, 2, 3, 4))
    experts = [RecordingEngine(_expert(tiny_policy, seed=i, version=3)) for i in range(len(tasks))]
    results = await run_concurrently(
        [
            lambda t=t, e=e: verified_episode(
                TaskSample(run="r", task=t),
                engine=e,
                sandbox=sandbox_client,
                settings=SETTINGS,
                source="expert",
            )
            for t, e in zip(tasks, experts, strict=True)
        ]
    )
    for task, expert, (traj, verified) in zip(tasks, experts, results, strict=True):
        assert traj.status == "completed", traj.abort_reason
        assert traj.source == "expert" and traj.traj_id == f"r:{task.task_id}:0"
        assert traj.sandbox_owner and traj.sandbox_id.startswith(f"{traj.sandbox_owner}:")
        assert traj.min_version == traj.max_version == 3
        assert len(traj.chunks) == int(task.metadata["level"]) + 1
        assert [c.tool_name for c in traj.chunks][-1] == "submit"
        assert all(c.tool_status == "ok" for c in traj.chunks)
        assert all(not unpack_logprobs(c.action_logprobs).any() for c in traj.chunks)
        assert traj.chunks[-1].obs_tokens == b""
        assert_exact_accounting(traj, expert.calls)
        assert verified  # in the sandbox the episode left open: the loop does not close it
    word_of_chain = [c.obs_text.strip() for c in results[3][0].chunks[:3]]  # level 4: three files
    assert word_of_chain[-1] == tasks[3].metadata["answer"]


@pytest.mark.docker
async def test_expert_mistakes_fail_verification_about_as_often_as_asked(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tasks = builtin_tasks(seed=4, count=24)
    results = await run_concurrently(
        [
            lambda i=i, t=t: verified_episode(
                TaskSample(run="r", task=t),
                engine=_expert(tiny_policy, seed=i, error_rate=0.5),
                sandbox=sandbox_client,
                settings=SETTINGS,
            )
            for i, t in enumerate(tasks)
        ]
    )
    assert all(traj.status == "completed" for traj, _ in results)
    failures = [ok for _, ok in results].count(False)
    assert 4 <= failures <= 16, failures
    assert "parse_error" in {c.tool_status for traj, _ in results for c in traj.chunks}


class FuzzEngine:
    """Emits a random mix of good calls, malformed calls, unknown tools, rambling and answers."""

    COMMANDS = ("cat note.txt", "ls", "yes | head -c 40000", "sleep 100")

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tokenizer, self.version, self.rng = tokenizer, 0, random.Random(seed)

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        out = []
        for r in requests:
            text = self.rng.choice(
                [
                    format_tool_call("bash", {"command": self.rng.choice(self.COMMANDS)}),
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


@pytest.mark.docker
async def test_accounting_is_exact_for_every_kind_of_ending(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    settings = HarnessSettings(
        max_new_tokens_per_turn=40, max_total_tokens=400, max_observation_tokens=24, command_timeout_s=0.5
    )
    tasks = builtin_tasks(seed=9, count=30)
    engines = [RecordingEngine(FuzzEngine(tok, seed=i)) for i in range(len(tasks))]
    results = await run_concurrently(
        [
            lambda i=i, t=t, e=e: verified_episode(
                TaskSample(run="fz", task=t, sample_idx=i),
                engine=e,
                sandbox=sandbox_client,
                settings=settings,
            )
            for i, (t, e) in enumerate(zip(tasks, engines, strict=True))
        ]
    )
    for (traj, _), engine in zip(results, engines, strict=True):
        assert_exact_accounting(traj, engine.calls)
        assert len(sequence_of(traj)) <= settings.max_total_tokens
        for c in traj.chunks:
            assert len(unpack_logprobs(c.action_logprobs)) * 4 == len(c.action_tokens)
    chunks = [c for traj, _ in results for c in traj.chunks]
    assert {traj.status for traj, _ in results} == {"completed", "truncated"}
    assert {c.tool_status for c in chunks} == {"ok", "error", "timeout", "parse_error", "none"}
    assert any("[output truncated]" in c.obs_text for c in chunks)  # `yes` really overflowed
    assert any("No such file" in c.obs_text for c in chunks)  # `cat note.txt` where there is none


@pytest.mark.docker
async def test_random_policy_episodes_account_exactly(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    engine = TorchEngine(tiny_policy, seed=0)
    settings = HarnessSettings(max_new_tokens_per_turn=24, max_total_tokens=260)
    statuses = []
    for i, task in enumerate(builtin_tasks(seed=1, count=6)):
        rec = RecordingEngine(engine)
        traj, _ = await verified_episode(
            TaskSample(run="rnd", task=task, sample_idx=i),
            engine=rec,
            sandbox=sandbox_client,
            settings=settings,
        )
        assert_exact_accounting(traj, rec.calls)
        statuses.append(traj.status)
        assert all(c.tool_status in ("parse_error", "none") for c in traj.chunks)
        assert all((unpack_logprobs(c.action_logprobs) < 0).all() for c in traj.chunks)
    assert "truncated" in statuses


@pytest.mark.docker
async def test_an_episode_samples_the_same_actions_alone_and_in_a_shared_batch(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    """Each turn's sampling seed comes from the harness seed, the episode id and the turn: the same
    weights replay an episode whatever else is in flight (reproducible evaluations)."""
    settings = HarnessSettings(max_new_tokens_per_turn=24, max_total_tokens=260)
    tasks = builtin_tasks(seed=1, count=3)
    mine = TaskSample(run="seeded", task=tasks[0])

    async def actions(sample: TaskSample, engine: Any, harness: HarnessSettings = settings) -> list[bytes]:
        traj, _ = await verified_episode(sample, engine=engine, sandbox=sandbox_client, settings=harness)
        assert traj.chunks and all(c.tool_status in ("parse_error", "none") for c in traj.chunks)
        return [c.action_tokens for c in traj.chunks]

    alone = await actions(mine, TorchEngine(tiny_policy, seed=1))
    shared = Batcher(TorchEngine(tiny_policy, seed=2), max_batch=3, max_wait_s=0.05)
    together = await run_concurrently(
        [
            lambda: actions(TaskSample(run="seeded", task=tasks[1]), shared),
            lambda: actions(mine, shared),
            lambda: actions(TaskSample(run="seeded", task=tasks[2]), shared),
        ]
    )
    assert shared.stats.largest > 1  # the episodes did share batches
    assert together[1] == alone
    other_sample = await actions(msgspec.structs.replace(mine, sample_idx=1), shared)
    other_seed = await actions(mine, shared, msgspec.structs.replace(settings, seed=1))
    assert other_sample[0] != alone[0] and other_seed[0] != alone[0]


@pytest.mark.docker
async def test_versions_are_stamped_per_chunk_when_weights_move_between_turns(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    expert = _expert(tiny_policy, version=1)

    async def bump() -> None:
        await expert.load_weights(b"", expert.version + 1)

    traj, verified = await verified_episode(
        TaskSample(run="v", task=_level3()),
        engine=expert,
        sandbox=sandbox_client,
        settings=SETTINGS,
        before_turn=bump,
    )
    assert verified
    assert [c.policy_version for c in traj.chunks] == [2, 3, 4, 5]
    assert (traj.min_version, traj.max_version) == (2, 5)


@pytest.mark.docker
async def test_a_sandbox_that_cannot_be_created_aborts_the_episode_before_any_turn(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    expert = RecordingEngine(_expert(tiny_policy))
    traj = await run_episode(
        TaskSample(run="a", task=_level3(environment="no-such-env")),
        engine=expert,
        sandbox=sandbox_client,
        settings=SETTINGS,
    )
    assert traj.status == "aborted" and traj.chunks == [] and traj.sandbox_id == ""
    assert traj.abort_reason.startswith("create failed: Sandbox") and "no-such-env" in traj.abort_reason
    assert_exact_accounting(traj, expert.calls)


async def test_an_episode_with_no_sandboxd_listening_is_aborted_instead_of_raising(
    nc: NATS,
    tiny_policy: Path,
) -> None:
    expert = RecordingEngine(_expert(tiny_policy))
    traj = await run_episode(
        TaskSample(run="a", task=_level3()),
        engine=expert,
        sandbox=SandboxClient(nc, request_timeout_s=1.0),  # a real broker where no sandboxd serves
        settings=SETTINGS,
    )
    assert traj.status == "aborted" and traj.chunks == []
    assert traj.abort_reason.startswith("create failed: ")
    assert traj.abort_reason.endswith("no sandboxd answers on rs.sandbox.create")
    assert_exact_accounting(traj, expert.calls)


@pytest.mark.docker
@pytest.mark.parametrize(("how", "turn"), [("kill", 1), ("rm -f", 3)])
async def test_a_sandbox_removed_mid_episode_aborts_it_with_exact_accounting(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
    how: str,
    turn: int,
) -> None:
    sample = TaskSample(run="a", task=_level3(), sample_idx=turn)
    expert = RecordingEngine(_expert(tiny_policy))
    turns = 0

    async def remove_before_the_turn() -> None:
        nonlocal turns
        turns += 1
        if turns == turn:
            await anyio.to_thread.run_sync(remove_container, sample.msg_id, how)

    traj = await run_episode(
        sample, engine=expert, sandbox=sandbox_client, settings=SETTINGS, before_turn=remove_before_the_turn
    )
    assert traj.status == "aborted" and traj.abort_reason.startswith("exec failed: Sandbox")
    assert len(traj.chunks) == turn and traj.chunks[-1].tool_status == "error"
    assert traj.chunks[-1].tool_name == "bash" and traj.chunks[-1].obs_text == traj.abort_reason
    assert all(c.tool_status == "ok" for c in traj.chunks[:-1])
    assert_exact_accounting(traj, expert.calls)
    await sandbox_client.close(traj.sandbox_id)  # already gone: closing is still fine


class _HangsOnTurn(FilesExpert):
    """The expert, but from turn ``hang_at`` on it never answers (the episode clock runs out)."""

    hang_at = 2
    turns = 0

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        self.turns += 1
        if self.turns >= self.hang_at:
            await anyio.sleep_forever()
        return await super().generate(requests)


@pytest.mark.docker
async def test_max_turns_and_episode_timeout_truncate(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    expert = RecordingEngine(_expert(tiny_policy))
    traj, verified = await verified_episode(
        TaskSample(run="t", task=_level3(max_turns=2)),
        engine=expert,
        sandbox=sandbox_client,
        settings=SETTINGS,
    )
    assert traj.status == "truncated" and len(traj.chunks) == 2 and not verified
    assert traj.chunks[-1].obs_tokens == b"" and traj.chunks[-1].obs_text  # text kept, tokens not fed
    assert_exact_accounting(traj, expert.calls)

    hangs = _HangsOnTurn(tokenizer=AutoTokenizer.from_pretrained(tiny_policy), error_rate=0.0, seed=0)
    settings = msgspec.structs.replace(SETTINGS, episode_timeout_s=3.0)
    traj, _ = await verified_episode(
        TaskSample(run="t", task=_level3()), engine=hangs, sandbox=sandbox_client, settings=settings
    )
    assert traj.status == "truncated" and traj.abort_reason == "episode_timeout"
    assert len(traj.chunks) == 1 and traj.chunks[0].obs_tokens == b"" and traj.chunks[0].obs_text


@pytest.mark.docker
async def test_prefix_calls_are_replayed_into_the_prompt(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    task = _level3()
    first = format_tool_call("bash", {"command": "cat " + task.metadata["chain"].split()[0]})
    expert = RecordingEngine(_expert(tiny_policy))
    traj, verified = await verified_episode(
        TaskSample(run="p", task=task, prefix_calls=[first]),
        engine=expert,
        sandbox=sandbox_client,
        settings=SETTINGS,
    )
    assert traj.status == "completed" and len(traj.chunks) == 3
    prompt = expert.tokenizer.decode(_ints(traj), skip_special_tokens=False)
    assert first in prompt
    assert task.metadata["chain"].split()[1] in prompt  # the replayed call's real output
    assert_exact_accounting(traj, expert.calls)
    assert verified


def _ints(traj: Trajectory) -> list[int]:
    return [int(t) for t in unpack_tokens(traj.prompt_tokens)]
