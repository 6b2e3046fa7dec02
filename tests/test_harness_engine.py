"""TorchEngine: behaviour log-probabilities, stopping, batching, weight loading."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from agent_harness.engine import GenRequest, InferenceEngine
from agent_harness.torch_engine import TorchEngine
from tests.factories import reference_logprobs


async def test_behaviour_logprobs_match_a_full_forward_pass_in_a_padded_batch(tiny_policy: Path) -> None:
    engine = TorchEngine(tiny_policy, seed=1)
    assert isinstance(engine, InferenceEngine)
    requests = [
        GenRequest(list(range(10, 40)), 24, temperature=1.0),
        GenRequest([7, 8, 9], 17, temperature=0.7),
        GenRequest(list(range(50, 110)), 30, temperature=1.3),
        GenRequest([5], 12, temperature=0.0),
    ]
    gens = await engine.generate(requests)
    for req, gen in zip(requests, gens, strict=True):
        assert len(gen.tokens) == len(gen.logprobs) == req.max_new_tokens
        assert gen.finish_reason == "length" and gen.version == 0
        ref = reference_logprobs(engine, req.prompt_tokens, gen.tokens, req.temperature)
        assert max(abs(a - b) for a, b in zip(ref, gen.logprobs, strict=True)) < 1e-4


async def test_generation_stops_after_a_stop_token(tiny_policy: Path) -> None:
    engine = TorchEngine(tiny_policy, seed=2)
    prompt = list(range(20, 30))
    [free] = await engine.generate([GenRequest(prompt, 20, temperature=0.0)])
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    [stopped] = await engine.generate([GenRequest(prompt, 20, temperature=0.0, stop_token_ids=[stop])])
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: first + 1]
    text = engine.tokenizer.decode(free.tokens[:6], skip_special_tokens=False)
    [by_string] = await engine.generate([GenRequest(prompt, 20, temperature=0.0, stop_strings=[text[-3:]])])
    assert by_string.finish_reason == "stop" and len(by_string.tokens) <= 6


async def test_same_seed_samples_the_same_tokens(tiny_policy: Path) -> None:
    a, b = TorchEngine(tiny_policy, seed=7), TorchEngine(tiny_policy, seed=7)
    req = [GenRequest(list(range(30, 40)), 16)]
    assert (await a.generate(req))[0].tokens == (await b.generate(req))[0].tokens


async def test_load_weights_changes_outputs_and_sets_the_version(tiny_policy: Path) -> None:
    engine = TorchEngine(tiny_policy, seed=3)
    prompt = list(range(10, 50))
    [before] = await engine.generate([GenRequest(prompt, 8, temperature=0.0)])
    state = safetensors.torch.load(engine.export_weights())
    gen = torch.Generator().manual_seed(0)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    await engine.load_weights(safetensors.torch.save(new), version=5)
    assert engine.version == 5
    [after] = await engine.generate([GenRequest(prompt, 8, temperature=0.0)])
    assert after.version == 5
    assert after.tokens != before.tokens or after.logprobs != before.logprobs
    ref = reference_logprobs(engine, prompt, after.tokens, 1.0)
    assert max(abs(a - b) for a, b in zip(ref, after.logprobs, strict=True)) < 1e-4
    assert torch.equal(engine.model.model.embed_tokens.weight, new["model.embed_tokens.weight"])


async def test_weights_of_another_shape_are_refused(tiny_policy: Path) -> None:
    engine = TorchEngine(tiny_policy)
    bad = safetensors.torch.save({"not.a.weight": torch.zeros(2)})
    try:
        await engine.load_weights(bad, version=1)
    except ValueError as exc:
        assert "do not match" in str(exc)
    else:
        raise AssertionError("mismatched weights were accepted")
    assert engine.version == 0
