"""External agent programs run by the agent runner: real nats-server, real sandboxd on Docker, the
real rollout and reward workers, the tiny torch policy behind the proxy, and records into a lake.

The scripted program (``tests/agents/scripted_agent.py``) always solves its task, so reward 1 must
flow through; mini-swe-agent (from PyPI) mostly fails with the tiny policy, so its test asserts the
records, not success.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import anyio
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.agent_runner import AgentCommandSettings, CommandAgentRunner
from agent_harness.settings import HarnessSettings
from agent_harness.torch_engine import TorchEngine
from consumers import reward, rollout
from consumers.lake import LakeWriter, query
from consumers.reward import score
from consumers.settings import RewardSettings, RolloutSettings
from sandboxd.client import SandboxClient
from sandboxd.users import AGENT_UID
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.task import Task, TaskSample
from schemas.trajectory import ScoredTrajectory, Trajectory
from streams.bus import Publisher
from streams.tasks import publish_samples
from streams.topology import ensure
from tests.factories import read_scored, running_sandboxd, segment_rows, settings_for_tests

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parents[1]
HARNESS = HarnessSettings(max_new_tokens_per_turn=8, command_timeout_s=10.0, episode_timeout_s=120.0)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}


def _task(task_id: str) -> Task:
    return Task(
        task_id=task_id,
        family="files",
        instruction="Write the word apple to answer.txt in the current directory.",
        verify=['test "$(cat answer.txt)" = apple'],
    )


async def _run_episodes(
    js: JetStreamContext,
    nc: NATS,
    run: str,
    policy: Path,
    engine: TorchEngine,
    argv: list[str],
    env: dict[str, str],
) -> ScoredTrajectory:
    settings = RolloutSettings(
        concurrency=1,
        heartbeat_s=5.0,
        harness=HARNESS,
        agent="command",
        agent_command=AgentCommandSettings(argv=argv, env=env, command_timeout_s=10.0),
    )
    await ensure(js, run)
    await publish_samples(js, Publisher(js), [TaskSample(run=run, task=_task(f"{run}-apple"))])
    async with anyio.create_task_group() as tg:
        await tg.start(
            functools.partial(rollout.run, settings, js, nc, run=run, policy_dir=policy, engine=engine)
        )
        await tg.start(functools.partial(reward.run, RewardSettings(concurrency=1), js, nc, run=run))
        got = await read_scored(js, run, 1, timeout_s=150)
        tg.cancel_scope.cancel()
    assert len(got) == 1
    return got[0]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_exact_logprobs(engine: TorchEngine, traj: Trajectory) -> None:
    """Recorded behaviour log-probs equal one forward pass over each segment (temperature 1)."""
    recorded: list[float] = []
    ref: list[float] = []
    for seq, starts in segment_rows(traj):
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([seq])).logits[0].float(), -1)
        for at, c in starts:
            recorded += list(unpack_logprobs(c.action_logprobs))
            ref += [logp[at - 1 + k, int(t)].item() for k, t in enumerate(unpack_tokens(c.action_tokens))]
    assert recorded and float(np.max(np.abs(np.array(recorded) - np.array(ref)))) < 1e-4


def _lake_rows(tmp_path: Path, scored: ScoredTrajectory) -> dict[str, object]:
    writer = LakeWriter(tmp_path / "lake", writer_id="t")
    writer.add_scored(scored)
    writer.flush()
    [row] = query(
        tmp_path / "lake",
        "SELECT t.reward, t.valid, t.source, t.policy_version AS v, count(*) AS chunks, "
        "sum(len(c.action_tokens)) AS actions, sum(len(c.action_logprobs)) AS logprobs, "
        "count(*) FILTER (WHERE len(c.context_tokens) > 0) AS restarts "
        "FROM trajectories t JOIN chunks c USING (traj_id) GROUP BY ALL",
    ).to_pylist()
    return row


async def test_a_scripted_agent_program_solves_its_task_through_the_runner_and_reward_1_lands_in_the_lake(
    nc: NATS, js: JetStreamContext, sandboxd_owner: str, tiny_policy: Path, tmp_path: Path
) -> None:
    engine = TorchEngine(tiny_policy, seed=0, version=3)
    argv = [sys.executable, "-m", "tests.agents.scripted_agent", "{base_url}", "{instruction}"]
    scored = await _run_episodes(js, nc, "agsc", tiny_policy, engine, argv, ENV)
    traj = scored.traj
    assert scored.valid and scored.reward == 1.0, scored.verifier_output
    assert traj.status == "completed" and traj.source == "proxy" and traj.sandbox_id
    assert traj.task is not None and traj.group_id == f"agsc:{traj.task.task_id}"
    # two calls continued by command output, then one after the program compacted its history
    assert len(traj.chunks) == 3 and [bool(c.context_tokens) for c in traj.chunks] == [False, False, True]
    assert f"apple\n{AGENT_UID}" in traj.chunks[0].obs_text  # run in the sandbox, as the agent uid
    restart = engine.tokenizer.decode(unpack_tokens(traj.chunks[2].context_tokens).tolist())
    assert restart.startswith("<|im_start|>user\nSummary: the answer is written.")
    assert all(c.policy_version == 3 for c in traj.chunks)
    _assert_exact_logprobs(engine, traj)
    n_actions = sum(len(unpack_tokens(c.action_tokens)) for c in traj.chunks)
    assert _lake_rows(tmp_path, scored) == {
        "reward": 1.0,
        "valid": True,
        "source": "proxy",
        "v": 3,
        "chunks": 3,
        "actions": n_actions,
        "logprobs": n_actions,
        "restarts": 1,
    }


MINI = shutil.which("mini", path=str(Path(sys.executable).parent))


async def test_mini_swe_agent_from_pypi_runs_against_the_proxy_and_its_calls_are_recorded(
    nc: NATS, js: JetStreamContext, sandboxd_owner: str, tiny_policy: Path, tmp_path: Path
) -> None:
    assert MINI is not None, "mini-swe-agent is a dev dependency: pip install -e '.[dev]'"
    engine = TorchEngine(tiny_policy, seed=1, version=5)
    argv = [
        str(MINI), "-y", "--exit-immediately", "-t", "{instruction}", "-m", "openai/rollstream",
        "--environment-class", "agent_harness.mini_swe_env.RollstreamEnvironment",
        "-c", "mini.yaml", "-c", "agent.step_limit=3", "-c", "agent.cost_limit=0",
        "-c", "model.model_kwargs.api_base={base_url}", "-c", "model.cost_tracking=ignore_errors",
        "-c", "environment.cwd={workdir}", "-o", "{home}/trajectory.json",
    ]  # fmt: skip
    env = ENV | {"MSWEA_CONFIGURED": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TERM": "dumb"}
    scored = await _run_episodes(js, nc, "agmini", tiny_policy, engine, argv, env)
    traj = scored.traj
    assert scored.valid and scored.reward in (0.0, 1.0), scored.invalid_reason
    assert traj.source == "proxy" and traj.status in ("completed", "truncated")
    assert len(traj.chunks) == 3, traj.abort_reason  # agent.step_limit (or 3 format errors in a row)
    # mini drops a malformed reply from its history before it asks again: a history edit, so such a
    # call starts a segment whose context still holds the task
    assert not traj.chunks[0].context_tokens
    for c in traj.chunks[1:]:
        if c.context_tokens:
            assert "apple" in engine.tokenizer.decode(unpack_tokens(c.context_tokens).tolist())
    assert all(c.policy_version == 5 for c in traj.chunks)
    assert all(
        len(unpack_tokens(c.action_tokens)) == len(unpack_logprobs(c.action_logprobs)) > 0
        for c in traj.chunks
    )
    prompt = engine.tokenizer.decode(unpack_tokens(traj.prompt_tokens).tolist())
    assert "apple" in prompt and '"name":"bash"' in prompt  # mini's task prompt and its bash tool
    _assert_exact_logprobs(engine, traj)
    row = _lake_rows(tmp_path, scored)
    assert (
        row["source"] == "proxy" and row["chunks"] == len(traj.chunks) and row["actions"] == row["logprobs"]
    )


async def test_a_program_past_its_time_limit_is_killed_with_its_children_and_sees_only_its_environment(
    js: JetStreamContext, sandbox_client: SandboxClient, tiny_policy: Path, tmp_path: Path
) -> None:
    script = f"env > {tmp_path}/env; sleep 60 & echo $! > {tmp_path}/child; wait"
    settings = AgentCommandSettings(argv=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"})
    engine = TorchEngine(tiny_policy, seed=0)
    runner = CommandAgentRunner(settings, HARNESS, engine, Publisher(js), "agto")
    task = msgspec.structs.replace(_task("slow"), agent_timeout_s=1.5)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.serve)
        traj = await runner.episode(TaskSample(run="agto", task=task), sandbox_client)
        tg.cancel_scope.cancel()
    await sandbox_client.close(traj.sandbox_id)
    assert traj.status == "truncated" and traj.abort_reason == "episode_timeout" and traj.chunks == []
    # its sandbox is gone: an external agent's commands cannot be re-executed from its chunks
    lost = await score(msgspec.structs.replace(traj, task=task), sandbox_client, 5.0)
    assert not lost.valid and "cannot be re-executed" in lost.invalid_reason
    child = int((tmp_path / "child").read_text())
    for _ in range(40):  # SIGKILL was sent; the kernel ends the process a moment later
        if not _running(child):
            break
        await anyio.sleep(0.05)
    assert not _running(child)  # its whole process group was killed
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert set(env) - {"PWD", "SHLVL", "_"} == {
        "PATH", "HOME", "OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY", "ROLLSTREAM_SESSION",
        "ROLLSTREAM_WORKDIR", "ROLLSTREAM_EXEC_URL", "ROLLSTREAM_EXEC_TOKEN",
    }  # fmt: skip
    assert env["OPENAI_BASE_URL"] == f"{runner.url.removesuffix('/v1')}/s/{env['ROLLSTREAM_SESSION']}/v1"
    assert not await anyio.Path(env["HOME"]).exists()  # the scratch directory went with the episode


async def test_an_agent_program_inside_the_sandbox_reaches_the_proxy_socket_and_nothing_else(
    nc: NATS, js: JetStreamContext, gem_image: str, tiny_policy: Path
) -> None:
    root = tempfile.mkdtemp(prefix="rsms-")  # short: a unix socket's path holds at most 107 bytes
    script = (REPO / "tests" / "agents" / "in_sandbox_agent.py").read_text()
    task = msgspec.structs.replace(
        _task("inside"), environment="gem", setup=[f"cat > /tmp/agent.py <<'PYEOF'\n{script}\nPYEOF"]
    )
    nats_port = nc.connected_url.port if nc.connected_url else 4222
    try:
        async with running_sandboxd(nc, settings_for_tests(nc, model_socket_root=root)):
            client = SandboxClient(nc)
            settings = AgentCommandSettings(argv=["python3", "/tmp/agent.py"], where="sandbox")
            engine = TorchEngine(tiny_policy, seed=0, version=2)
            runner = CommandAgentRunner(settings, HARNESS, engine, Publisher(js), "agin")
            async with anyio.create_task_group() as tg:
                await tg.start(runner.serve)
                ports = [str(urlparse(runner.url).port), str(nats_port), "2375", "22"]
                runner.settings = msgspec.structs.replace(settings, argv=[*settings.argv, *ports])
                traj = await runner.episode(TaskSample(run="agin", task=task), client)
                probe = json.loads(await client.read_file(traj.sandbox_id, "/work/probe.json"))
                scored = await score(msgspec.structs.replace(traj, task=task), client, 10.0)
                tg.cancel_scope.cancel()
        left = os.listdir(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert traj.status == "completed", traj.abort_reason
    assert scored.valid and scored.reward == 1.0, scored.verifier_output
    [chunk] = traj.chunks  # its one model call, recorded through the socket
    assert chunk.policy_version == 2 and len(chunk.action_logprobs) == 4 * len(
        unpack_tokens(chunk.action_tokens)
    )
    assert probe["reply"] == "chat.completion" and probe["uid"] == AGENT_UID
    assert probe["interfaces"] == ["lo"] and not probe["docker_socket"]
    assert probe["socket_dir"] == ["proxy.sock"] and not probe["socket_dir_writable"]
    assert all(result != "open" for result in probe["probes"].values()), probe["probes"]
    assert len(probe["probes"]) == 10
    assert probe["unscoped_call"] == probe["forged_finish"] == 404
    assert left == []  # the socket's directory went with the sandbox
