"""GEM environments in real sandboxes (real sandboxd on a real nats-server, real Docker), through
the GEM API and through the agent loop. The ``gem`` image is built on first use (~90 s)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import anyio
import msgspec
import pytest
from transformers import AutoTokenizer

from agent_harness.loop import run_episode
from agent_harness.settings import HarnessSettings
from consumers.probe import ProbeSettings, run_probe
from consumers.reward import score
from producers import families
from producers.families.gem import GemToolRegistry, GuessTheNumberExpert, act_call, next_guess
from producers.families.gem.api import (
    RESULT_PATH,
    VERIFY_COMMAND,
    EpisodeResult,
    GemError,
    GemSession,
    StepResult,
    decode_answer,
    stop_command,
)
from producers.families.gem.tasks import family_of, gem_seed, gem_task, gem_tasks
from sandboxd import envhub
from sandboxd.client import SandboxClient
from schemas.sandbox import ExecResult
from schemas.task import TaskSample
from tests.factories import GUESS, GUESS_RANDOM, RecordingEngine, assert_exact_accounting

SETTINGS = HarnessSettings(max_new_tokens_per_turn=64, max_total_tokens=1800, max_observation_tokens=96)


async def _binary_search(env: GemSession, first_observation: str) -> list[StepResult]:
    context, steps = first_observation, []
    while not steps or not steps[-1].done:
        steps.append(await env.step(f"I guess \\boxed{{{next_guess(context)}}}"))
        context += "\n" + steps[-1].observation
        assert len(steps) <= 4
    return steps


@pytest.mark.docker
async def test_binary_search_wins_guess_the_number_inside_a_sandbox(
    gem_image: str, sandbox_client: SandboxClient
) -> None:
    async with await GemSession.open(sandbox_client, GUESS) as env:
        for seed in (0, 7):
            observation, info = await env.reset(seed)
            assert "between 1 and 10" in observation and info["suffix"]
            steps = await _binary_search(env, observation)
            assert steps[-1].terminated and not steps[-1].truncated
            assert steps[-1].reward == 1.0 and steps[-1].total_reward == 1.0
            assert "Congratulations" in steps[-1].observation
            result = await env.result()
            assert result == EpisodeResult(
                env_id=GUESS,
                seed=seed,
                steps=len(steps),
                total_reward=1.0,
                terminated=True,
                truncated=False,
                won=True,
            )
            assert (await sandbox_client.exec(env.sandbox_id, VERIFY_COMMAND)).exit_code == 0


@pytest.mark.docker
async def test_random_play_ends_the_episode_and_a_lost_game_fails_verification(
    gem_image: str, sandbox_client: SandboxClient
) -> None:
    rng = random.Random(3)
    async with await GemSession.open(sandbox_client, GUESS) as env:
        await env.reset(11)
        steps: list[StepResult] = []
        while not (steps and steps[-1].done) and len(steps) < 10:
            steps.append(await env.step(f"\\boxed{{{rng.randint(1, 10)}}}"))
        assert steps[-1].done and len(steps) <= 4  # the game's own turn limit ends it
        assert steps[-1].terminated and (steps[-1].reward == 1.0) == (await env.result()).won
        # Guesses out of range never win: the game ends at its turn limit, truncated, reward 0.
        await env.reset(12)
        lost = [await env.step("\\boxed{99}") for _ in range(4)]
        assert [s.done for s in lost] == [False, False, False, True]
        assert lost[-1].truncated and lost[-1].total_reward == 0.0
        with pytest.raises(GemError) as over:
            await env.step("\\boxed{5}")
        assert over.value.kind == "episode_over"
        assert not (await env.result()).won
        assert (await sandbox_client.exec(env.sandbox_id, VERIFY_COMMAND)).exit_code == 1


@pytest.mark.docker
async def test_the_resident_gem_process_serves_steps_and_its_loss_or_stop_leaves_the_game_intact(
    gem_image: str, sandbox_client: SandboxClient
) -> None:
    async with await GemSession.open(sandbox_client, GUESS) as env:
        observation, _ = await env.reset(7)
        alive = await sandbox_client.exec(env.sandbox_id, "test -S /work/.gem/driver.sock")
        assert alive.exit_code == 0  # reset started the episode's resident process
        guess = next_guess(observation)
        first = await env.step(f"\\boxed{{{guess}}}")
        # the server goes away mid-episode (stopped here; killed or lost alike): the next step runs
        # in its own process from the saved episode and continues the same game
        stopped = await sandbox_client.exec(env.sandbox_id, stop_command())
        assert '"stopped": true' in stopped.stdout
        assert (await sandbox_client.exec(env.sandbox_id, "test -S /work/.gem/driver.sock")).exit_code == 1
        second = await env.step(f"\\boxed{{{next_guess(observation + chr(10) + first.observation)}}}")
        assert second.steps == 2 and second.total_reward >= first.total_reward
        # a new reset starts a new resident process; stopping it leaves nothing the probe would flag
        await env.reset(8)
        await env.step("\\boxed{5}")
        await sandbox_client.exec(env.sandbox_id, stop_command())
        findings = await run_probe(sandbox_client, env.sandbox_id, ProbeSettings())
        assert [f for f in findings if f.flag == "leftover_process"] == []
        assert (await env.result()).steps == 1


@pytest.mark.docker
async def test_unknown_and_unavailable_env_ids_give_clear_errors(
    gem_image: str, sandbox_client: SandboxClient
) -> None:
    async with await GemSession.open(sandbox_client, "game:NoSuchGame-v0") as env:
        with pytest.raises(GemError) as before:
            await env.step("\\boxed{1}")
        assert before.value.kind == "no_episode"
        with pytest.raises(GemError) as unknown:
            await env.reset(0)
        assert unknown.value.kind == "unknown_env" and unknown.value.env_id == "game:NoSuchGame-v0"
        assert (
            "'game:NoSuchGame-v0'" in unknown.value.message
            and "game:GuessTheNumber-v0-*" in unknown.value.message
        )
        env.env_id = "game:Wordle-v0-easy"  # registered by GEM, but its word list needs nltk
        with pytest.raises(GemError) as unavailable:
            await env.reset(0)
        assert unavailable.value.kind == "unavailable" and "nltk" in unavailable.value.message
        assert GUESS in await env.env_ids()
    with pytest.raises(GemError) as producing:
        await gem_tasks(sandbox_client, "game:NoSuchGame-v0", seed=0, count=2)
    assert producing.value.kind == "unknown_env"


@pytest.mark.docker
async def test_gem_tasks_play_through_the_agent_loop_and_winning_scores_one(
    gem_image: str,
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tasks = await gem_tasks(sandbox_client, GUESS_RANDOM, seed=5, count=2)
    assert [t.family for t in tasks] == [family_of(GUESS_RANDOM)] * 2 and len({t.task_id for t in tasks}) == 2
    for task in tasks:
        engine = RecordingEngine(GuessTheNumberExpert(tokenizer=tok, version=2))
        traj = await run_episode(
            TaskSample(run="gem", task=task),
            engine=engine,
            sandbox=sandbox_client,
            settings=SETTINGS,
            registry=GemToolRegistry(),
        )
        try:
            assert traj.status == "completed", traj.abort_reason
            assert 1 <= len(traj.chunks) <= 9
            assert all(c.tool_name == "act" and c.tool_status == "ok" for c in traj.chunks)
            assert "Congratulations" in traj.chunks[-1].obs_text and traj.chunks[-1].obs_tokens == b""
            assert all("target number is" in c.obs_text for c in traj.chunks[:-1])
            assert_exact_accounting(traj, engine.calls)
            verify = await sandbox_client.exec(traj.sandbox_id, task.verify[0])
            assert verify.exit_code == 0
            result = msgspec.json.decode(
                await sandbox_client.read_file(traj.sandbox_id, RESULT_PATH), type=EpisodeResult
            )
            assert result.won and result.total_reward == 1.0 and result.steps == len(traj.chunks)
        finally:
            with anyio.move_on_after(30, shield=True):
                await sandbox_client.close(traj.sandbox_id)


@pytest.mark.docker
async def test_a_lost_gem_sandbox_is_rebuilt_by_replaying_the_act_steps_its_family_names(
    gem_image: str,
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    [task] = await gem_tasks(sandbox_client, GUESS_RANDOM, seed=9, count=1)
    traj = await run_episode(
        TaskSample(run="gem", task=task),
        engine=GuessTheNumberExpert(tokenizer=tok),
        sandbox=sandbox_client,
        settings=SETTINGS,
        registry=families.tools_for(task),
    )
    assert traj.status == "completed" and traj.chunks[-1].tool_name == "act"
    await sandbox_client.close(traj.sandbox_id)
    traj = msgspec.structs.replace(traj, task=task)
    scored = await score(traj, sandbox_client, 30.0, tools_for=families.tools_for)
    assert scored.valid and scored.reward == 1.0
    assert scored.verifier_output.startswith("[re-executed in a fresh sandbox]")
    # Without the family's tools no move is replayed: the rebuilt game was never played, so lost.
    blind = await score(traj, sandbox_client, 30.0)
    assert blind.valid and blind.reward == 0.0


def test_gem_tasks_are_deterministic_in_seed_and_index() -> None:
    assert [gem_seed(1, i) for i in range(3)] == [gem_seed(1, i) for i in range(3)]
    assert len({gem_seed(s, i) for s in range(3) for i in range(50)}) == 150
    task = gem_task(GUESS, 42, "You are playing Guess The Number.\n")
    assert task.family == "gem:game:GuessTheNumber-v0-easy" and task.environment == "gem"
    assert task.setup == ["python3 /opt/gem_driver.py reset game:GuessTheNumber-v0-easy 42"]
    assert task.verify == [VERIFY_COMMAND] and task.instruction.startswith("You are playing")
    assert "act tool" in task.instruction


def test_binary_search_guesses_follow_the_games_hints() -> None:
    context = "<|im_start|>user\nguess the number between 1 and 10 (inclusive)"
    assert next_guess(context) == 5
    context += "\nAt turn 1, you guessed 5, and the target number is higher than 5."
    assert next_guess(context) == 8
    context += "\nAt turn 2, you guessed 8, and the target number is lower than 8."
    assert next_guess(context) == 6
    assert act_call("\\boxed{6}").startswith("<tool_call>") and '"name":"act"' in act_call("x")


def test_driver_faults_become_gem_errors_and_answers_decode() -> None:
    def result(code: int, stdout: str, stderr: str = "") -> ExecResult:
        return ExecResult(exit_code=code, stdout=stdout, stderr=stderr, duration_ms=1.0)

    step = decode_answer(
        result(0, 'log line\n{"observation": "o", "reward": 1.0, "terminated": true, "truncated": false}'),
        StepResult,
    )
    assert step.done and step.reward == 1.0
    with pytest.raises(GemError) as fault:
        decode_answer(
            result(3, '{"error": "unknown_env", "message": "unknown GEM env id \'x\'"}'), StepResult
        )
    assert fault.value.kind == "unknown_env"
    with pytest.raises(GemError) as crash:
        decode_answer(result(1, "", "Traceback ...\nImportError: gem"), StepResult)
    assert crash.value.kind == "driver_failed" and "ImportError" in crash.value.message


def test_the_gem_spec_tags_its_wheels_and_driver_while_older_specs_keep_their_tags() -> None:
    base, gem = envhub.load_spec("base"), envhub.load_spec("gem")
    # What the spec hashed to before `python_wheels`, `files` (and the task fields `workdir`, `env`,
    # `user`) existed: base keeps its tag.
    before = {
        k: v
        for k, v in msgspec.to_builtins(base, order="sorted").items()
        if k not in ("python_wheels", "files", "workdir", "env", "user")
    }
    assert envhub.spec_hash(base) == hashlib.sha256(msgspec.json.encode(before)).hexdigest()[:12]
    assert gem.files == {"/opt/gem_driver.py": "../../producers/families/gem/driver.py"}
    assert "gem-llm==0.1.0" in gem.python_wheels
    other = msgspec.structs.replace(gem, python_wheels=[*gem.python_wheels, "pandas==2.2.3"])
    assert envhub.spec_hash(other) != envhub.spec_hash(gem)
