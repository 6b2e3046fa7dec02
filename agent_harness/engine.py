"""The inference-engine contract: token ids in, sampled token ids and behaviour log-probs out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class GenRequest:
    """Continue ``prompt_tokens`` by at most ``max_new_tokens`` tokens.

    Generation stops after (and includes) the first token in ``stop_token_ids`` or the first token
    whose decoded continuation contains one of ``stop_strings``. ``session`` names the episode (or
    conversation) the request belongs to: engines with several servers send one session's requests
    to one server, whose prefix cache then holds the episode's context.

    ``seed`` (``sampling_seed``) makes the request's sampling its own: the same weights, prompt and
    seed give the same tokens whatever other requests share the batch and in whatever order they
    came (up to float round-off of a padded batch). Without it the engine's own generator samples.
    The torch engine honours it; server engines sample with their servers' generators.
    """

    prompt_tokens: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] | None = None
    session: str = ""
    seed: int | None = None


def sampling_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. the harness seed, an episode id and a turn), stable
    across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True, slots=True)
class Generation:
    """Sampled tokens with their behaviour log-probabilities (one per token).

    ``version`` is the policy version that produced the tokens when the engine knows it exactly
    (it may differ from ``engine.version`` read before the call if weights moved meanwhile).
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    version: int | None = field(default=None)


@runtime_checkable
class InferenceEngine(Protocol):
    """What the agent loop needs from a policy: a version, a tokenizer, generation, weight loading."""

    @property
    def version(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...  # a Hugging Face tokenizer (PreTrainedTokenizerFast)

    async def generate(self, requests: list[GenRequest]) -> list[Generation]: ...

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None: ...
