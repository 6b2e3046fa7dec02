"""The OpenAI-compatible proxy, driven by the official ``openai`` client over real HTTP on 127.0.0.1.

Real nats-server (trajectories land on JetStream), real torch, and for the tool-using agent a real
sandbox; the trajectory is then written to a real Parquet lake and read back with DuckDB.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import openai
import pytest
import torch
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from agent_harness.batcher import Batcher
from agent_harness.proxy import ModelProxy, ProxySettings
from agent_harness.tools import ToolRegistry
from agent_harness.torch_engine import TorchEngine
from consumers.lake import LakeWriter, query
from producers.families.files import FilesExpert, builtin_tasks
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.codec import traj_decoder
from schemas.trajectory import ScoredTrajectory, Trajectory
from streams.bus import Publisher
from streams.topology import TRAJ, ensure, subject
from tests.factories import RecordingEngine, assert_exact_accounting, segment_rows

RUN = "px"
SYSTEM = "You are an agent in a Linux shell. Use one tool per turn."


@pytest.fixture
async def stream(js: JetStreamContext) -> JetStreamContext:
    await ensure(js, RUN)
    return js


async def _records(js: JetStreamContext, kind: str, n: int) -> list[Trajectory | ScoredTrajectory]:
    sub = await js.pull_subscribe(subject(kind, RUN), stream=TRAJ.name)
    out: list[Trajectory | ScoredTrajectory] = []
    with anyio.move_on_after(20):
        while len(out) < n:
            for m in await sub.fetch(10, timeout=5):
                out.append(traj_decoder.decode(m.data))
                await m.ack()
    return out


@contextlib.asynccontextmanager
async def _serving(proxy: ModelProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    url = await proxy.start()
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        await client.close()
        await proxy.stop()


@pytest.mark.docker
async def test_openai_client_completes_a_tool_using_task_and_the_trajectory_lands_in_the_lake(
    stream: JetStreamContext,
    sandbox_client: SandboxClient,
    tiny_policy: Path,
    tmp_path: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    engine = RecordingEngine(FilesExpert(tokenizer=tok, error_rate=0.0, seed=0, version=7))
    proxy = ModelProxy(engine, Publisher(stream), RUN, ProxySettings(port=0, model="tiny"))
    task = builtin_tasks(seed=3, count=3)[2]  # level 3: three bash calls, then submit
    sandbox = await sandbox_client.create()
    for command in task.setup:
        await sandbox_client.exec(sandbox.sandbox_id, command)
    headers = {"X-Rollstream-Session": "agent-1"}
    try:
        async with _serving(proxy) as client:
            assert [m.id async for m in client.models.list()] == ["tiny"]
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": task.instruction},
            ]
            submitted = False
            for _ in range(8):
                resp = await client.chat.completions.create(
                    model="tiny", messages=messages, tools=ToolRegistry().schemas(), extra_headers=headers
                )
                choice = resp.choices[0]
                assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
                messages.append(choice.message.model_dump(exclude_none=True))
                for call in choice.message.tool_calls:
                    args = json.loads(call.function.arguments)
                    if call.function.name == "submit":
                        submitted, output = True, "submitted"
                    else:
                        res = await sandbox_client.exec(sandbox.sandbox_id, args["command"])
                        output = res.stdout + res.stderr
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
                if submitted:
                    break
            assert submitted
            codes = [(await sandbox_client.exec(sandbox.sandbox_id, c)).exit_code for c in task.verify]
            reward = 1.0 if codes == [0] * len(codes) else 0.0
            async with httpx.AsyncClient() as http:
                done = await http.post(
                    f"{client.base_url}rollstream/sessions/agent-1/finish", json={"reward": reward}
                )
            assert done.status_code == 200 and done.json()["traj_ids"] == [f"{RUN}:proxy:agent-1:0"]
    finally:
        with anyio.move_on_after(30, shield=True):
            await sandbox_client.close(sandbox.sandbox_id)
    assert reward == 1.0
    [scored] = await _records(stream, "scored", 1)
    assert isinstance(scored, ScoredTrajectory) and scored.reward == 1.0
    traj = scored.traj
    assert traj.source == "proxy" and traj.group_id == f"{RUN}:proxy:agent-1"
    assert [c.tool_name for c in traj.chunks] == ["bash", "bash", "bash", "submit"]
    assert all(c.policy_version == 7 and c.tool_status == "ok" for c in traj.chunks)
    assert "<tool_response>" in traj.chunks[0].obs_text
    assert_exact_accounting(traj, engine.calls)  # every prompt fed is the rebuilt prefix

    writer = LakeWriter(tmp_path / "lake", writer_id="t")
    writer.add_scored(scored)
    writer.flush()
    row = query(
        tmp_path / "lake",
        "SELECT t.reward, t.source, count(*) AS chunks, min(c.policy_version) AS v, "
        "sum(len(c.action_tokens)) AS actions, sum(len(c.action_logprobs)) AS logprobs "
        "FROM trajectories t JOIN chunks c USING (traj_id) GROUP BY ALL",
    ).to_pylist()
    n_actions = sum(len(unpack_tokens(c.action_tokens)) for c in traj.chunks)
    assert row == [
        {"reward": 1.0, "source": "proxy", "chunks": 4, "v": 7, "actions": n_actions, "logprobs": n_actions}
    ]


def _reference(engine: TorchEngine, traj: Trajectory) -> tuple[list[float], list[float]]:
    """Behaviour log-probs recorded vs one forward pass per segment (temperature 1)."""
    recorded: list[float] = []
    ref: list[float] = []
    for seq, starts in segment_rows(traj):
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([seq])).logits[0].float(), -1)
        for at, c in starts:
            actions = unpack_tokens(c.action_tokens)
            recorded += list(unpack_logprobs(c.action_logprobs))
            ref += [logp[at - 1 + k, int(t)].item() for k, t in enumerate(actions)]
    return recorded, ref


async def test_a_history_edit_starts_a_linked_segment_of_the_same_trajectory_with_exact_logprobs(
    stream: JetStreamContext,
    tiny_policy: Path,
) -> None:
    torch_engine = TorchEngine(tiny_policy, seed=3, version=2)
    proxy = ModelProxy(Batcher(torch_engine), Publisher(stream), RUN, ProxySettings(port=0))
    async with _serving(proxy) as client:
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Write the word apple to answer.txt"}]
        for turn in range(3):
            resp = await client.chat.completions.create(
                model="rollstream", messages=messages, max_tokens=12, user="sess-7"
            )
            assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12
            assert resp.system_fingerprint == "policy-v2"
            messages.append(resp.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "user", "content": f"try again ({turn})"})
        # the client compacts its history: a new segment of the same trajectory starts
        compacted = [{"role": "user", "content": "summary: tried three times"}, *messages[-2:]]
        await client.chat.completions.create(
            model="rollstream", messages=compacted, max_tokens=4, user="sess-7"
        )
        assert await proxy.finish("sess-7", reward=None) == [f"{RUN}:proxy:sess-7:0"]
    [traj] = await _records(stream, "raw", 1)
    assert isinstance(traj, Trajectory) and traj.abort_reason == "" and len(traj.chunks) == 4
    assert [bool(c.context_tokens) for c in traj.chunks] == [False, False, False, True]
    assert traj.min_version == traj.max_version == 2
    assert traj.chunks[0].obs_tokens and not traj.chunks[2].obs_tokens and not traj.chunks[3].obs_tokens
    assert [c.index for c in traj.chunks] == [0, 1, 2, 3]
    recorded, ref = _reference(torch_engine, traj)
    assert len(recorded) == sum(len(unpack_tokens(c.action_tokens)) for c in traj.chunks)
    assert float(np.max(np.abs(np.array(recorded) - np.array(ref)))) < 1e-4


async def test_idle_sessions_are_published_and_bad_requests_get_openai_errors(
    stream: JetStreamContext,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    expert = FilesExpert(tokenizer=tok, error_rate=0.0, seed=0)
    proxy = ModelProxy(expert, Publisher(stream), RUN, ProxySettings(port=0, idle_timeout_s=0.05))
    async with _serving(proxy) as client:
        await client.chat.completions.create(
            model="rollstream",
            messages=[{"role": "user", "content": "The file a.txt names a file."}],
            tools=ToolRegistry().schemas(),
        )
        assert len(proxy.sessions) == 1  # keyed by a hash of the conversation's first messages
        with pytest.raises(openai.BadRequestError, match="role 'robot'"):
            await client.chat.completions.create(
                model="rollstream", messages=[{"role": "robot", "content": "x"}]
            )  # type: ignore[list-item]
        async with httpx.AsyncClient() as http:
            missing = await http.post(f"{client.base_url}rollstream/sessions/nope/finish")
        assert missing.status_code == 404 and "no open session" in missing.json()["error"]["message"]
        await anyio.sleep(0.1)
        [traj_id] = await proxy.reap_idle()
    [raw] = await _records(stream, "raw", 1)
    assert isinstance(raw, Trajectory) and raw.traj_id == traj_id
    assert raw.abort_reason == "idle_timeout" and raw.status == "truncated"
    assert raw.chunks[0].tool_name == "bash" and raw.chunks[0].tool_status == "ok"
