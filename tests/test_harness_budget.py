"""The context budget in a real sandbox: long outputs keep head and tail, the sequence never
exceeds ``max_total_tokens``, and an episode that would need its context edited ends truncated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from transformers import AutoTokenizer

from agent_harness.engine import Generation, GenRequest
from agent_harness.loop import run_episode
from agent_harness.prompt import encode
from agent_harness.settings import HarnessSettings
from agent_harness.tools import format_tool_call
from producers.families.files import builtin_tasks
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_tokens
from schemas.task import TaskSample
from tests.factories import RecordingEngine, assert_exact_accounting, sequence_of

pytestmark = pytest.mark.docker


class _Chatty:
    """Always asks for a long listing (an engine that writes one fixed tool call)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.version = tokenizer, 0
        self.ids = encode(tokenizer, format_tool_call("bash", {"command": "seq 1 3000"}))

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        return [
            Generation(self.ids[: r.max_new_tokens], [-0.5] * len(self.ids[: r.max_new_tokens]), "stop", 0)
            for r in requests
        ]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self.version = version


async def test_long_observations_are_cut_to_the_budget_and_the_episode_ends_truncated_exactly(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    settings = HarnessSettings(
        max_new_tokens_per_turn=48, max_total_tokens=440, max_observation_tokens=120, min_turn_tokens=24
    )
    task = msgspec.structs.replace(builtin_tasks(seed=1, count=1)[0], max_turns=30)
    engine = RecordingEngine(_Chatty(tok))
    traj = await run_episode(
        TaskSample(run="b", task=task), engine=engine, sandbox=sandbox_client, settings=settings
    )
    try:
        assert traj.status == "truncated" and traj.abort_reason.startswith("context_budget: ")
        seq = sequence_of(traj)
        assert len(seq) <= settings.max_total_tokens
        assert_exact_accounting(traj, engine.calls)
        first = traj.chunks[0].obs_text
        assert first.startswith("1\n2\n3\n") and "3000" in first and "middle cut" in first
        fed = [len(unpack_tokens(c.obs_tokens)) for c in traj.chunks[:-1]]
        assert fed[-1] < fed[0]  # the last fed observation was cut harder to fit the budget
        assert traj.chunks[-1].obs_tokens == b"" and "2999" in traj.chunks[-1].obs_text  # kept as text
        assert settings.max_total_tokens - len(seq) < settings.min_turn_tokens + 60
    finally:
        with anyio.move_on_after(30, shield=True):
            await sandbox_client.close(traj.sandbox_id)
