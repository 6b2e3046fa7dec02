"""Bad input and broken infrastructure give clear records, and the workers keep going.

Real nats-server, real sandboxd on the real Docker engine, the real rollout and reward code paths
(``agent_harness.loop.run_episode``, ``consumers.reward.score``, ``consumers.rollout.run``,
``consumers.reward.run``); the policy is the scripted expert on the tiny policy's tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from agent_harness.engine import Generation, GenRequest
from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from consumers import reward, rollout
from consumers.reward import score
from consumers.settings import RewardSettings, RolloutSettings
from producers.families.files import FilesExpert, builtin_tasks
from sandboxd.client import SandboxClient
from schemas.task import Task, TaskSample
from streams.bus import Publisher
from streams.tasks import publish_samples
from streams.topology import ensure
from tests.factories import read_scored, remove_container

pytestmark = pytest.mark.docker
SETTINGS = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=600, command_timeout_s=5.0)


def _task(index: int = 1, **changes: object) -> Task:
    return msgspec.structs.replace(builtin_tasks(seed=8, count=3)[index], **changes)


def _expert(policy: Path, version: int = 0) -> FilesExpert:
    return FilesExpert(
        tokenizer=AutoTokenizer.from_pretrained(policy), error_rate=0.0, seed=0, version=version
    )


async def test_a_task_whose_environment_does_not_exist_is_aborted_and_scored_invalid(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    task = _task(environment="no-such-env")
    traj = await run_episode(
        TaskSample(run="f", task=task), engine=_expert(tiny_policy), sandbox=sandbox_client, settings=SETTINGS
    )
    assert traj.status == "aborted" and traj.chunks == []
    assert traj.abort_reason.startswith("create failed") and "no-such-env" in traj.abort_reason
    scored = await score(msgspec.structs.replace(traj, task=task), sandbox_client, 5.0)
    assert not scored.valid and scored.invalid_reason == f"aborted: {traj.abort_reason}"


class _KillsItsSandbox(FilesExpert):
    """The expert, but before its second turn the episode's container is killed with ``docker kill``."""

    traj_label = ""
    calls = 0

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        self.calls += 1
        if self.calls == 2:
            await anyio.to_thread.run_sync(remove_container, self.traj_label)
        return await super().generate(requests)


async def test_a_sandbox_killed_mid_episode_aborts_it_with_the_reason(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    task = _task(2)  # level 3: the kill lands before the second of three commands
    sample = TaskSample(run="f", task=task, sample_idx=1)
    engine = _KillsItsSandbox(tokenizer=AutoTokenizer.from_pretrained(tiny_policy), error_rate=0.0, seed=0)
    engine.traj_label = sample.msg_id
    traj = await run_episode(sample, engine=engine, sandbox=sandbox_client, settings=SETTINGS)
    assert traj.status == "aborted" and traj.abort_reason.startswith("exec failed: Sandbox")
    assert len(traj.chunks) == 2 and traj.chunks[-1].tool_status == "error"
    assert traj.chunks[-1].obs_text == traj.abort_reason
    scored = await score(msgspec.structs.replace(traj, task=task), sandbox_client, 5.0)
    assert not scored.valid and scored.invalid_reason.startswith("aborted: exec failed")


async def test_verification_reruns_the_calls_in_a_fresh_sandbox_when_the_original_is_gone(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    task = _task(2)
    traj = await run_episode(
        TaskSample(run="f", task=task), engine=_expert(tiny_policy), sandbox=sandbox_client, settings=SETTINGS
    )
    assert traj.status == "completed"
    await sandbox_client.close(traj.sandbox_id)
    scored = await score(msgspec.structs.replace(traj, task=task), sandbox_client, 5.0)
    assert scored.valid and scored.reward == 1.0
    assert scored.verifier_output.startswith("[re-executed in a fresh sandbox]")
    # an answer that was wrong stays wrong when rebuilt
    wrong = msgspec.structs.replace(task, verify=['test "$(cat answer.txt)" = "not-the-word"'])
    traj = await run_episode(
        TaskSample(run="f", task=wrong),
        engine=_expert(tiny_policy),
        sandbox=sandbox_client,
        settings=SETTINGS,
    )
    await sandbox_client.close(traj.sandbox_id)
    scored = await score(msgspec.structs.replace(traj, task=wrong), sandbox_client, 5.0)
    assert scored.valid and scored.reward == 0.0


async def test_workers_record_bad_tasks_and_hung_verifiers_and_keep_scoring_good_ones(
    nc: NATS,
    js: JetStreamContext,
    sandboxd_owner: str,
    tiny_policy: Path,
) -> None:
    run = "faults"
    rollout_settings = RolloutSettings(concurrency=2, heartbeat_s=5.0, harness=SETTINGS)
    reward_settings = RewardSettings(concurrency=2, verify_timeout_s=1.0)
    await ensure(js, run)
    good = _task(0, group_size=2)
    samples = [
        TaskSample(run=run, task=_task(1, task_id="bad-env", environment="no-such-env")),
        TaskSample(run=run, task=_task(0, task_id="hangs", verify=["sleep 30"])),
        TaskSample(run=run, task=good, sample_idx=0),
        TaskSample(run=run, task=good, sample_idx=1),
    ]
    await publish_samples(js, Publisher(js), samples)  # the tasks into the registry, then the samples
    async with anyio.create_task_group() as tg:
        expert = _expert(tiny_policy, version=4)
        await tg.start(
            functools.partial(
                rollout.run, rollout_settings, js, nc, run=run, policy_dir=tiny_policy, engine=expert
            )
        )
        await tg.start(functools.partial(reward.run, reward_settings, js, nc, run=run))
        got = {s.traj.traj_id: s for s in await read_scored(js, run, len(samples), timeout_s=90, unique=True)}
        tg.cancel_scope.cancel()
    assert set(got) == {s.msg_id for s in samples}
    bad = got[samples[0].msg_id]
    assert not bad.valid and bad.traj.status == "aborted"
    assert bad.invalid_reason.startswith("aborted: create failed") and "no-such-env" in bad.invalid_reason
    hung = got[samples[1].msg_id]
    assert hung.traj.status == "completed" and not hung.valid
    assert hung.invalid_reason.startswith("verify command timed out")
    pair = [got[samples[2].msg_id], got[samples[3].msg_id]]
    assert all(s.valid and s.reward == 1.0 for s in pair)
    assert {s.traj.group_id for s in pair} == {f"{run}:{good.task_id}"}  # one group, two samples
    assert sorted(s.traj.sample_idx for s in pair) == [0, 1]
    assert all(c.policy_version == 4 for s in pair for c in s.traj.chunks)
