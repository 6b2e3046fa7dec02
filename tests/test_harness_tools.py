"""Tool-call parsing, the tool registry, the tokenizer and the prompt pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent_harness.prompt import encode, observation_tokens, prompt_tokens, truncate_middle
from agent_harness.tokenizer import SPECIAL_TOKENS, train_tokenizer
from agent_harness.tools import ParseError, ToolCall, ToolRegistry, format_tool_call, parse_tool_call
from producers.families.files import corpus
from schemas.sandbox import ExecResult


def test_a_well_formed_call_parses_into_name_and_arguments() -> None:
    call = parse_tool_call(
        'some thought <tool_call>\n{"name": "bash", "arguments": {"command": "ls -l"}}\n</tool_call>'
    )
    assert call == ToolCall("bash", {"command": "ls -l"})
    assert call.arguments_json == '{"command":"ls -l"}'


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("I am done.", "no_tool_call"),
        ('<tool_call>{"name": "bash", "arguments": {"command": "ls"}}', "missing_close"),
        ('<tool_call>{"name": "bash", "arguments": {"command": "ls"</tool_call>', "bad_json"),
        ("<tool_call>[1, 2]</tool_call>", "bad_shape"),
        ('<tool_call>{"name": "bash", "arguments": "ls"}</tool_call>', "bad_shape"),
    ],
)
def test_malformed_calls_are_parse_errors_of_the_right_kind(text: str, kind: str) -> None:
    result = parse_tool_call(text)
    assert isinstance(result, ParseError)
    assert result.kind == kind


async def test_unknown_tools_and_bad_arguments_give_error_observations() -> None:
    registry = ToolRegistry()
    ran: list[str] = []

    async def run(command: str) -> ExecResult:
        ran.append(command)
        return ExecResult(exit_code=0, stdout="hi\n", stderr="")

    unknown = await registry.execute(ToolCall("python", {"code": "1"}), run, timeout_s=1)
    assert unknown.status == "error" and "unknown tool 'python'" in unknown.text
    missing = await registry.execute(ToolCall("bash", {"cmd": "ls"}), run, timeout_s=1)
    assert missing.status == "error" and "'command'" in missing.text
    assert ran == []
    ok = await registry.execute(ToolCall("bash", {"command": "echo hi"}), run, timeout_s=1)
    assert (ok.status, ok.text, ok.done) == ("ok", "hi\n", False)
    done = await registry.execute(ToolCall("submit", {"answer": "x"}), run, timeout_s=1)
    assert done.done and done.status == "ok"


async def test_timeouts_and_exit_codes_show_in_the_observation() -> None:
    async def slow(command: str) -> ExecResult:
        return ExecResult(exit_code=-1, stdout="part", stderr="", timed_out=True)

    async def failing(command: str) -> ExecResult:
        return ExecResult(exit_code=1, stdout="", stderr="cat: x: No such file or directory\n")

    registry = ToolRegistry()
    timed = await registry.execute(ToolCall("bash", {"command": "sleep 9"}), slow, timeout_s=2)
    assert timed.status == "timeout" and "timed out after 2s" in timed.text
    failed = await registry.execute(ToolCall("bash", {"command": "cat x"}), failing, timeout_s=2)
    assert failed.status == "ok" and failed.text.endswith("[exit code 1]")


def test_schemas_list_both_tools_for_the_system_prompt() -> None:
    names = [s["function"]["name"] for s in ToolRegistry().schemas()]
    assert names == ["bash", "submit"]


def test_tool_call_text_round_trips_through_the_tokenizer(tiny_policy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    for special in SPECIAL_TOKENS:
        assert len(encode(tok, special)) == 1, special
    text = format_tool_call("bash", {"command": "cat start.txt && echo 'x y' > answer.txt"})
    ids = encode(tok, text)
    assert ids[0] == tok.convert_tokens_to_ids("<tool_call>")
    assert ids[-1] == tok.convert_tokens_to_ids("</tool_call>")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert parse_tool_call(tok.decode(ids, skip_special_tokens=False)) == ToolCall(
        "bash", {"command": "cat start.txt && echo 'x y' > answer.txt"}
    )


def test_the_saved_checkpoint_loads_back_and_encodes_like_the_trained_tokenizer(tiny_policy: Path) -> None:
    loaded = AutoTokenizer.from_pretrained(tiny_policy)
    trained = train_tokenizer(corpus(seed=0))
    for text in corpus(seed=3, episodes=50):
        assert encode(loaded, text) == encode(trained, text)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(loaded)
    assert 512 <= len(loaded) <= 1100


def test_prompt_ends_with_the_assistant_header_and_observations_close_the_turn(tiny_policy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    ids = prompt_tokens(tok, "Write the word apple to answer.txt.", ToolRegistry())
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("Write the word apple to answer.txt.<|im_end|>\n<|im_start|>assistant\n")
    obs = observation_tokens(tok, encode(tok, "apple\n"), action_closed=False)
    assert tok.decode(obs, skip_special_tokens=False) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\napple\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_long_observations_keep_head_and_tail(tiny_policy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    text = "HEAD " + " ".join(f"line{i}" for i in range(300)) + " TAIL"
    ids, kept = truncate_middle(tok, text, 40)
    assert len(ids) <= 40
    assert kept.startswith("HEAD") and kept.endswith("TAIL") and "middle cut" in kept
    short, same = truncate_middle(tok, "apple\n", 40)
    assert same == "apple\n" and short == encode(tok, "apple\n")
