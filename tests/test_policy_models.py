"""Bring your own model: tiny offline Qwen2, Llama and Mistral checkpoints with their families' chat
templates, rendered incrementally (prefix-consistent), their tool-call formats, the torch engine's
batched KV-cached generation in float32 and bfloat16, and the ``[policy]`` configuration."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import torch
from transformers import AutoTokenizer

from agent_harness.architectures import ARCHITECTURES
from agent_harness.batcher import Batcher
from agent_harness.chat import assistant_key, chat_format, parse_reply, render
from agent_harness.engine import GenRequest
from agent_harness.formats import FORMATS, ToolFormatError, detect_format
from agent_harness.model import PolicySettings
from agent_harness.prompt import SYSTEM, ChatTemplateError, Conversation, encode, prompt_tokens
from agent_harness.scripted import ScriptedEngine
from agent_harness.settings import HarnessSettings
from agent_harness.tokenizer import LEGACY_CHAT_TEMPLATE, train_tokenizer
from agent_harness.tools import ParseError, ToolCall, ToolRegistry
from agent_harness.torch_engine import TorchEngine
from learner.batch import build_batch
from learner.ipa import token_logprobs
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from ops.config import ConfigError, load_config
from producers.families.files import corpus
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.task import Task, TaskSample
from schemas.trajectory import ScoredTrajectory
from tests.factories import (
    RecordingEngine,
    assert_exact_accounting,
    chunk,
    make_arch_policy,
    reference_logprobs,
    run_concurrently,
    sample,
    sequence_of,
    verified_episode,
)

ARCHS = sorted(ARCHITECTURES)
FORMAT_OF = {"qwen2": "hermes", "llama": "llama3_json", "mistral": "mistral"}


@pytest.fixture(scope="module")
def arch_policy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_arch_policy(root / arch, arch) for arch in ARCHS}


def _full_render(tok: Any, conv: Conversation, instruction: str, turns: list[tuple[str, str]]) -> str:
    """The whole conversation rendered in one go, with the real actions and results."""
    if conv.fold_system:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"{SYSTEM}\n\n{instruction}"}]
    else:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]
    for k, (action, result) in enumerate(turns, start=1):
        msgs.append({"role": "assistant", "content": action})
        msgs.append({"role": "tool", "content": result, "tool_call_id": f"call{k:05d}", "name": "bash"})
    text: str = tok.apply_chat_template(msgs, tools=conv.tools, add_generation_prompt=True, tokenize=False)
    for action, _ in turns:  # a lead the template writes before a message (Mistral's " ") is the policy's
        text = text.replace(conv.assistant_lead + action, action)
    return text


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_rendering_equals_rendering_the_whole_conversation(
    arch: str, arch_policy: dict[str, Path]
) -> None:
    tok = AutoTokenizer.from_pretrained(arch_policy[arch])
    conv = Conversation(tok, ToolRegistry())
    assert conv.format.name == FORMAT_OF[arch]
    instruction = "Write the word apple to answer.txt."
    seq = conv.prompt(instruction)
    turns: list[tuple[str, str]] = []
    rng = random.Random(arch)
    for k in range(4):
        action = conv.write_call(ToolCall("bash", {"command": f'echo "{rng.random():.3f}" > f{k}'}))
        closed = k % 2 == 0  # the policy closes its message itself, or stops at the call's end
        action_ids = encode(tok, action + (conv.end_of_turn if closed else ""))
        result = f'line "{k}"\n\ttabbed \\ {rng.randint(0, 99)}'
        frame = conv.frame(action_ids)
        seq += action_ids + conv.observation(frame, encode(tok, result), result)
        conv.commit(frame)
        turns.append((action, result))
    assert tok.decode(seq, skip_special_tokens=False) == _full_render(tok, conv, instruction, turns)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_loaded_tokenizer_encodes_as_the_trained_one(arch: str, arch_policy: dict[str, Path]) -> None:
    spec = ARCHITECTURES[arch]
    trained = train_tokenizer(
        corpus(seed=0, episodes=60),
        vocab_size=768,
        special_tokens=spec.specials,
        eos=spec.eos,
        pad=spec.pad,
        bos=spec.bos,
        chat_template=spec.template,
    )
    loaded = AutoTokenizer.from_pretrained(arch_policy[arch])
    for text in corpus(seed=5, episodes=5):
        assert encode(loaded, text) == encode(trained, text)


def test_a_template_that_rewrites_earlier_turns_fails_loudly(arch_policy: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(arch_policy["qwen2"])
    tok.chat_template = (  # keeps only the latest tool result, as context-trimming templates do
        "{%- for m in messages -%}{%- if m.role != 'tool' or loop.last -%}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<tool_call><|im_end|>\n{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )
    with pytest.raises(ChatTemplateError, match=r"dropped a message|re-renders earlier turns"):
        Conversation(tok, ToolRegistry())


def test_policies_made_with_the_legacy_template_keep_their_prompt_tokens(tiny_policy: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    current = prompt_tokens(tok, "Write the word pear to answer.txt.", ToolRegistry())
    tok.chat_template = LEGACY_CHAT_TEMPLATE
    assert prompt_tokens(tok, "Write the word pear to answer.txt.", ToolRegistry()) == current


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_parses_what_it_writes_and_names_its_mistakes(name: str) -> None:
    fmt = FORMATS[name]
    call = ToolCall("bash", {"command": 'echo "a b" > x'})
    assert fmt.parse(fmt.write(call)) == call
    assert fmt.parse("I think the answer is 42.") == ParseError("no_tool_call", fmt.parse("x").message)  # type: ignore[union-attr]
    broken = fmt.write(call)[:-6]
    parsed = fmt.parse(broken)
    assert isinstance(parsed, ParseError) and parsed.kind in ("bad_json", "missing_close")


def test_formats_read_the_variants_models_write() -> None:
    llama, mistral = FORMATS["llama3_json"], FORMATS["mistral"]
    two = llama.parse_all(
        '<|python_tag|>{"name": "a", "arguments": {}}; {"name": "b", "parameters": {"x": "1"}}'
    )
    assert two == [ToolCall("a", {}), ToolCall("b", {"x": "1"})]
    as_string = mistral.parse('[TOOL_CALLS] [{"name": "bash", "arguments": "{\\"command\\": \\"ls\\"}"}]</s>')
    assert as_string == ToolCall("bash", {"command": "ls"})
    assert isinstance(llama.parse('{"arguments": {}}'), ParseError)


def test_the_format_is_detected_from_the_template_or_must_be_named() -> None:
    assert {a: detect_format(ARCHITECTURES[a].template).name for a in ARCHS} == FORMAT_OF
    with pytest.raises(ToolFormatError, match=r"policy\.tool_format"):
        detect_format("{{ messages }}")


@pytest.mark.parametrize(("arch", "dtype"), [("llama", "float32"), ("mistral", "bfloat16")])
async def test_batched_cached_generation_logs_the_full_forward_logprobs(
    arch: str, dtype: str, arch_policy: dict[str, Path]
) -> None:
    engine = TorchEngine(arch_policy[arch], seed=0, dtype=dtype)  # type: ignore[arg-type]
    assert next(engine.model.parameters()).dtype == getattr(torch, dtype)
    tok = engine.tokenizer
    conv = Conversation(tok, ToolRegistry())
    prompts = [conv.prompt(f"Write the word {w} to answer.txt.") for w in ("fig", "a much longer pear")]
    gens = await engine.generate([GenRequest(p, 12, 1.0) for p in prompts])
    tolerance = 1e-4 if dtype == "float32" else 0.1  # bf16 rounds differently with and without cache
    for prompt, gen in zip(prompts, gens, strict=True):
        assert len(gen.tokens) == len(gen.logprobs) == 12
        ref = reference_logprobs(engine, prompt, gen.tokens, 1.0)
        assert max(abs(a - b) for a, b in zip(gen.logprobs, ref, strict=True)) < tolerance


def test_policy_settings_that_cannot_load_name_their_key(
    tmp_path: Path, arch_policy: dict[str, Path]
) -> None:
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"state_dir={json.dumps(str(tmp_path))}", *overrides])
        return str(info.value)

    assert "policy.path" in error(f"policy.path={json.dumps(str(tmp_path / 'nowhere'))}")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert "chat template" in error(f"policy.path={json.dumps(str(bare))}")
    if not torch.cuda.is_available():
        assert "policy.device" in error("policy.device=cuda:0")
    assert "policy.dtype" in error("policy.dtype=float64")
    cfg = load_config(None, [f"policy.path={json.dumps(str(arch_policy['llama']))}", "policy.dtype=bfloat16"])
    assert cfg.policy_dir == arch_policy["llama"] and cfg.policy == PolicySettings(
        path=str(arch_policy["llama"]), dtype="bfloat16"
    )


class FormatExpert(ScriptedEngine):
    """Writes ``echo <word> > answer.txt`` then ``submit`` in the policy's own tool format, closing
    each message with the template's end-of-turn token."""

    def __init__(self, tokenizer: Any, word: str) -> None:
        super().__init__(tokenizer=tokenizer)
        self.conv = Conversation(tokenizer, ToolRegistry())
        self.word, self.turn = word, 0

    def next_action(self, context: str) -> str:
        self.turn += 1
        call = (
            ToolCall("bash", {"command": f'echo "{self.word}" > answer.txt && cat answer.txt'})
            if self.turn == 1
            else ToolCall("submit", {"answer": self.word})
        )
        return self.conv.write_call(call) + self.conv.end_of_turn


def _task(word: str) -> Task:
    return Task(
        task_id=f"byo-{word}",
        family="files",
        instruction=f"Write the word {word} to answer.txt.",
        verify=[f"grep -qx {word} /work/answer.txt"],
        max_turns=3,
    )


@pytest.mark.docker
@pytest.mark.parametrize("arch", ARCHS)
async def test_episodes_of_every_architecture_keep_exact_tokens_in_real_sandboxes(
    arch: str, arch_policy: dict[str, Path], sandbox_client: SandboxClient
) -> None:
    engine = TorchEngine(arch_policy[arch], seed=1, dtype="bfloat16")
    settings = HarnessSettings(max_new_tokens_per_turn=20, max_total_tokens=1400, max_observation_tokens=48)
    batcher = Batcher(engine, max_batch=2)  # the two random-policy episodes share batches
    words = ("fig", "plum", "kiwi")
    engines = [
        RecordingEngine(batcher),
        RecordingEngine(batcher),
        RecordingEngine(FormatExpert(engine.tokenizer, "kiwi")),
    ]
    results = await run_concurrently(
        [
            lambda i=i, w=w, e=e: verified_episode(
                TaskSample(run="byo", task=_task(w), sample_idx=i),
                engine=e,
                sandbox=sandbox_client,
                settings=settings if i < 2 else msgspec.structs.replace(settings, max_new_tokens_per_turn=80),
            )
            for i, (w, e) in enumerate(zip(words, engines, strict=True))
        ]
    )
    for (traj, _), rec in zip(results[:2], engines, strict=False):  # random weights: every token accounted
        assert traj.chunks and all(c.tool_status in ("parse_error", "none") for c in traj.chunks)
        for c in traj.chunks:
            lps = unpack_logprobs(c.action_logprobs)
            assert len(lps) == len(unpack_tokens(c.action_tokens)) and (lps <= 0).all()
        assert_exact_accounting(traj, rec.calls)
    traj, verified = results[2]
    assert traj.status == "completed" and verified, [
        (c.tool_name, c.tool_args, c.obs_text) for c in traj.chunks
    ]
    assert [(c.tool_name, c.tool_status) for c in traj.chunks] == [("bash", "ok"), ("submit", "ok")]
    assert traj.chunks[0].obs_text.strip() == "kiwi"
    assert_exact_accounting(traj, engines[2].calls)
    fed = engine.tokenizer.decode(sequence_of(traj), skip_special_tokens=False)
    assert fed.count("kiwi") >= 4  # instruction, the call, its output, submit


def _loglik(trainer: Trainer, s: ScoredTrajectory) -> float:
    b = build_batch([s], pad_id=trainer.pad_id, gamma=1.0, failure_reward=0.0)
    with torch.no_grad():
        lp = token_logprobs(trainer.model(input_ids=b.input_ids).logits, b.input_ids)
    return float(lp[b.action_mask].sum())


def test_the_learner_trains_in_bfloat16_and_its_weights_load_into_a_float32_engine(
    arch_policy: dict[str, Path],
) -> None:
    settings = LearnerSettings(lr=1e-2, seed=0, loss="sft")
    trainer = Trainer(arch_policy["qwen2"], settings, PolicySettings(dtype="bfloat16"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    s = sample([5, 6, 7], [chunk([30, 31, 32], obs=[40, 41]), chunk([33, 34])], 1.0)
    before = _loglik(trainer, s)
    for _ in range(3):
        assert not trainer.train_step([s]).skipped
    assert _loglik(trainer, s) > before + 0.5
    engine = TorchEngine(arch_policy["qwen2"])  # float32
    anyio.run(engine.load_weights, trainer.weights_bytes(), 1)
    ref = reference_logprobs(engine, [5, 6, 7], [30, 31, 32], 1.0)
    assert sum(ref) == pytest.approx(_loglik(trainer, sample([5, 6, 7], [chunk([30, 31, 32])], 1.0)), abs=0.3)


def test_gradient_checkpointing_gives_the_same_step(arch_policy: dict[str, Path]) -> None:
    settings = LearnerSettings(lr=1e-3, seed=0)
    s = sample(
        [5, 6, 7], [chunk([30, 31, 32], [-6.0, -6.1, -6.2], [40, 41]), chunk([33, 34], [-6.0, -6.0])], 1.0
    )
    plain = Trainer(arch_policy["llama"], settings).train_step([s])
    checkpointed = Trainer(arch_policy["llama"], settings, PolicySettings(gradient_checkpointing=True))
    assert checkpointed.model.is_activation_checkpointing
    step = checkpointed.train_step([s])
    assert step.loss == pytest.approx(plain.loss, rel=1e-5)
    assert step.grad_norm == pytest.approx(plain.grad_norm, rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_requests_extend_the_previous_request_token_for_token(
    arch: str, arch_policy: dict[str, Path]
) -> None:
    tok = AutoTokenizer.from_pretrained(arch_policy[arch])
    conv = chat_format(tok)
    tools = ToolRegistry().schemas()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "List the files."},
    ]
    first = render(tok, messages, tools, {})
    action = encode(tok, conv.write_call(ToolCall("bash", {"command": "ls -a"})) + conv.end_of_turn)
    reply = parse_reply(tok.decode(action, skip_special_tokens=False), conv.format)
    assert reply.status == "ok" and reply.first_call == ToolCall("bash", {"command": "ls -a"})
    assert set(conv.stop_ids) >= {action[-1]}
    generated = {assistant_key(reply.message(), 0): action}
    call_id = reply.tool_calls[0]["id"]
    messages += [reply.message(), {"role": "tool", "tool_call_id": call_id, "content": "a.txt\nb.txt"}]
    second = render(tok, messages, tools, generated)
    assert second[: len(first) + len(action)] == first + action
    messages += [{"role": "assistant", "content": "Two files."}, {"role": "user", "content": "Thanks."}]
    extends = render(tok, messages, tools, generated)[: len(second)] == second
    assert extends == (arch != "mistral")  # Mistral moves its tools to the newest user message


def test_the_model_benchmark_fills_a_row_per_architecture_and_dtype(arch_policy: dict[str, Path]) -> None:
    from ops.bench.models import SECTIONS, Context

    ctx = Context({"llama": arch_policy["llama"]}, ("float32", "bfloat16"), batch=2, new_tokens=4, repeats=1)
    for section in SECTIONS.values():
        table = section(ctx)
        assert table.row_count == 2
        rates = list(table.columns[-2 if section is SECTIONS["generation"] else -1].cells)
        assert all(float(str(r).replace(",", "")) > 0 for r in rates)
