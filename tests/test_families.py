"""Task families behind one interface: the registry, the hooks the workers receive, the producer's
stream of a family, and the one scripted-engine shape of both experts (on the tiny policy's real
tokenizer)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from transformers import AutoTokenizer

from agent_harness.engine import GenRequest
from agent_harness.scripted import ScriptedEngine
from agent_harness.tools import ToolCall, ToolRegistry, format_tool_call
from consumers.reward import replay_command
from ops.config import load_config
from producers import families
from producers.families.files import FILES, FilesExpert, task_at
from producers.families.gem import GEM, GemToolRegistry, GuessTheNumberExpert, gem_task, won_only
from producers.families.gem.api import RESULT_PATH, step_command
from producers.settings import ProducerSettings
from producers.tasks import task_stream
from schemas.task import Task
from schemas.trajectory import Chunk, ToolStatus
from tests.factories import GUESS, chunk


def _names(registry: ToolRegistry) -> set[str]:
    return set(registry.specs)


def test_the_registry_finds_each_family_by_name_source_and_task() -> None:
    assert families.get("files") is FILES and families.get("gem") is GEM
    with pytest.raises(KeyError, match="families: files, gem, harbor, swe"):
        families.get("webshop")
    assert families.for_source("builtin") is FILES and families.for_source("gem") is GEM
    assert families.for_source("harbor") is families.get("harbor") and families.for_source(
        "swe"
    ) is families.get("swe")
    assert families.for_source("jsonl") is None
    assert families.of_task(gem_task(GUESS, 1, "hi")) is GEM
    assert families.of_task(task_at(0, 0, (1,))) is FILES
    assert families.of_task(Task(task_id="t", family="webshop", instruction="x")) is None


def test_each_task_gets_its_familys_tools_and_unknown_families_the_default() -> None:
    assert _names(families.tools_for(task_at(0, 0, (1,)))) == {"bash", "submit"}
    assert isinstance(families.tools_for(gem_task(GUESS, 1, "hi")), GemToolRegistry)
    assert _names(families.tools_for(Task(task_id="t", family="swe", instruction="x"))) == {"bash", "submit"}


def _chunk(name: str, args: dict[str, object], status: ToolStatus = "ok") -> Chunk:
    return chunk(status=status, tool_name=name, tool_args=msgspec.json.encode(args).decode())


def test_the_reward_worker_rebuilds_a_sandbox_with_the_commands_the_tasks_tools_ran() -> None:
    act = _chunk("act", {"action": "\\boxed{5}"})
    assert replay_command(act, GemToolRegistry()) == step_command("\\boxed{5}")
    assert replay_command(act, ToolRegistry()) == ""  # a tool the task does not offer ran nothing
    assert replay_command(_chunk("bash", {"command": "echo hi > a"}), ToolRegistry()) == "echo hi > a"
    assert replay_command(_chunk("bash", {"command": "ls", "x": "1"}), ToolRegistry()) == ""  # rejected
    assert replay_command(_chunk("submit", {"answer": "w"}), ToolRegistry()) == ""
    assert replay_command(_chunk("bash", {"command": "ls"}, "parse_error"), ToolRegistry()) == ""


async def test_the_producer_streams_the_family_its_source_names_with_stable_ids() -> None:
    settings = load_config(None, ["producer.seed=7", "producer.levels=[1, 3]"]).producer
    stream = task_stream(settings, 62, sandbox=None)  # type: ignore[arg-type]  # files read no sandbox
    got = [await anext(stream) for _ in range(FILES.batch + 2)]  # into the second batch
    assert [i for i, _ in got] == list(range(62, 62 + FILES.batch + 2))
    assert [t for _, t in got] == [task_at(7, i, (1, 3)) for i, _ in got]
    assert FILES.batch == 64 and got[-1][1].task_id == "files-s7-000127-L3"  # ids as before families


def test_won_only_drops_the_graded_reward_file_and_the_producer_setting_selects_it() -> None:
    task = gem_task(GUESS, 3, "obs")
    assert task.metadata["result_path"] == RESULT_PATH
    assert "result_path" not in won_only(task).metadata and won_only(task).verify == task.verify
    assert ProducerSettings().reward == "graded"
    assert load_config(None, ['producer.reward="won"']).producer.reward == "won"


async def test_a_scripted_engine_cuts_its_message_like_a_model_generation(
    tiny_policy: Path,
) -> None:
    class Says(ScriptedEngine):
        def next_action(self, context: str) -> str:
            return format_tool_call("bash", {"command": "echo " + "word " * 20})

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    close = tok.convert_tokens_to_ids("</tool_call>")
    engine = Says(tokenizer=tok, version=4)
    [whole] = await engine.generate([GenRequest([1, 2], max_new_tokens=200, stop_token_ids=[close])])
    assert whole.finish_reason == "stop" and whole.tokens[-1] == close and whole.version == 4
    assert whole.logprobs == [0.0] * len(whole.tokens)
    [cut] = await engine.generate([GenRequest([1, 2], max_new_tokens=10, stop_token_ids=[close])])
    assert cut.finish_reason == "length" and cut.tokens == whole.tokens[:10]  # never past the limit
    await engine.load_weights(b"", 9)
    assert engine.version == 9


async def test_both_families_experts_are_scripted_engines_seeded_for_reproducible_errors(
    tiny_policy: Path,
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    for family in (FILES, GEM):
        expert = family.expert(tokenizer=tok, error_rate=0.5, seed=3, version=2)
        assert isinstance(expert, ScriptedEngine) and expert.version == 2
    assert isinstance(FILES.expert(tokenizer=tok, error_rate=0.0, seed=0, version=0), FilesExpert)
    prompt = "<|im_start|>user\nguess the number between 1 and 10 (inclusive)"
    players = [GuessTheNumberExpert(tokenizer=tok, error_rate=0.5, seed=s) for s in (1, 1, 2)]
    runs = [[p.next_action(prompt) for _ in range(12)] for p in players]
    assert runs[0] == runs[1] != runs[2] and len(set(runs[0])) > 1  # errs, reproducibly
    call = ToolCall("act", {"action": "\\boxed{5}"})
    assert GemToolRegistry().command(call) == step_command("\\boxed{5}")
