"""Tiny policies, an engine that records what it was fed, and checks of exact token accounting.

transformers and torch are imported inside the builders that need them, so a lake test does not
pay for them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent_harness.engine import Generation, GenRequest, InferenceEngine
from schemas.arrays import unpack_tokens
from schemas.trajectory import Chunk, Trajectory, segments

if TYPE_CHECKING:
    from transformers import Qwen2Config

    from agent_harness.torch_engine import TorchEngine


def tiny_qwen2_config(**overrides: Any) -> Qwen2Config:
    """A two-layer Qwen2 of 64 tokens (any other config field)."""
    from transformers import Qwen2Config

    fields: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }
    return Qwen2Config(**(fields | overrides))


def make_policy(path: Path) -> None:
    """Random weights of the 64-token Qwen2 at ``path`` (no tokenizer: the learner needs none)."""
    from transformers import Qwen2ForCausalLM

    Qwen2ForCausalLM(tiny_qwen2_config(max_position_embeddings=256)).save_pretrained(path)


def make_tiny_policy(path: Path) -> Path:
    """The tiny policy the harness tests run: a tokenizer trained on the files family's corpus and
    random weights, both seeded 0 (skipped if ``path`` already holds it)."""
    from agent_harness.policy_init import create_tiny_policy
    from producers.families.files import corpus

    return create_tiny_policy(path, corpus(seed=0), seed=0)


def make_arch_policy(path: Path, arch: str) -> Path:
    """A tiny offline checkpoint of architecture ``arch`` (``agent_harness.architectures``) with a
    tokenizer trained on the files family's corpus."""
    from agent_harness.architectures import create_policy
    from producers.families.files import corpus

    return create_policy(path, arch, corpus(seed=0, episodes=60), seed=0)


class RecordingEngine:
    """Wraps an engine and records every (prompt fed, tokens generated) pair."""

    def __init__(self, inner: InferenceEngine) -> None:
        self.inner = inner
        self.calls: list[tuple[list[int], list[int]]] = []

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def version(self) -> int:
        return self.inner.version

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        gens = await self.inner.generate(requests)
        for r, g in zip(requests, gens, strict=True):
            self.calls.append((list(r.prompt_tokens), list(g.tokens)))
        return gens

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        await self.inner.load_weights(safetensors_bytes, version)


def sequence_of(traj: Trajectory) -> list[int]:
    """prompt + Σ (action + observation), as the learner rebuilds it."""
    parts = [unpack_tokens(traj.prompt_tokens)]
    for c in traj.chunks:
        parts += [unpack_tokens(c.action_tokens), unpack_tokens(c.obs_tokens)]
    return [int(t) for t in np.concatenate(parts)]


def segment_rows(traj: Trajectory) -> list[tuple[list[int], list[tuple[int, Chunk]]]]:
    """Each segment's token sequence with the position where each of its chunks' actions start."""
    rows = []
    for context, chunks in segments(traj):
        seq: list[int] = unpack_tokens(context).tolist()
        starts = []
        for c in chunks:
            starts.append((len(seq), c))
            seq += unpack_tokens(c.action_tokens).tolist() + unpack_tokens(c.obs_tokens).tolist()
        rows.append((seq, starts))
    return rows


def assert_exact_accounting(traj: Trajectory, calls: list[tuple[list[int], list[int]]]) -> None:
    """Every prompt fed is the rebuilt prefix, and the last fed + generated is the whole sequence."""
    assert len(calls) == len(traj.chunks)
    seq = sequence_of(traj)
    for (fed, generated), c in zip(calls, traj.chunks, strict=True):
        assert seq[: len(fed)] == fed
        assert list(unpack_tokens(c.action_tokens)) == generated
    if calls:
        fed, generated = calls[-1]
        assert fed + generated == seq
    else:
        assert seq == list(unpack_tokens(traj.prompt_tokens))


def reference_logprobs(
    engine: TorchEngine, prompt: list[int], tokens: list[int], temperature: float
) -> list[float]:
    """The log-probs of ``tokens`` after ``prompt`` from one full forward pass of the engine's model."""
    import torch

    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return [logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(tokens)]
