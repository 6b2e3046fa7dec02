"""Local torch inference for any Hugging Face causal-LM checkpoint, on any device and dtype
(``[policy] device`` and ``dtype``; CPU and float32 by default).

Behaviour log-probabilities: for a request with temperature ``T > 0`` each sampled token ``y_t`` is
drawn from ``softmax(logits_t / T)`` and its recorded log-probability is
``log_softmax(logits_t / T)[y_t]`` — the exact sampling distribution, so the learner's importance
ratio against ``π_θ`` at the same temperature is 1 on-policy. With ``T == 0`` decoding is greedy
and the recorded value is ``log_softmax(logits_t)[y_t]`` (the untempered distribution).

One call of ``generate`` runs its requests as one left-padded batch with a KV cache: the prompts go
through the model once, then each step feeds only the newest token of every row. Logits are taken in
float32 whatever the weights' dtype, so behaviour log-probabilities are computed the same way as the
learner's. Generation and weight loading are serialised by a lock and run in a worker thread,
never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import safetensors.torch
import torch
from transformers import AutoTokenizer, DynamicCache

from agent_harness.engine import FinishReason, Generation, GenRequest
from agent_harness.model import DType, PolicySettings, load_model


@dataclass
class _Row:
    req: GenRequest
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


class TorchEngine:
    """An ``InferenceEngine`` backed by a local ``transformers`` model."""

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        device: str = "cpu",
        dtype: DType = "float32",
        attn_implementation: str = "",
        seed: int | None = None,
        num_threads: int | None = 1,
        version: int = 0,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        load = PolicySettings(device=device, dtype=dtype, attn_implementation=attn_implementation)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(checkpoint_dir)
        self.model: Any = load_model(checkpoint_dir, load)
        self.device = next(self.model.parameters()).device
        self.version = version
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._rng = torch.Generator(device=self.device)
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)
        self._lock = anyio.Lock()

    @classmethod
    def for_policy(cls, checkpoint_dir: Path, policy: PolicySettings, **options: Any) -> TorchEngine:
        """The engine for ``checkpoint_dir`` with ``[policy]``'s device, dtype and attention."""
        return cls(
            checkpoint_dir,
            device=policy.device,
            dtype=policy.dtype,
            attn_implementation=policy.attn_implementation,
            **options,
        )

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        if not requests:
            return []
        async with self._lock:
            version = self.version
            rows = await anyio.to_thread.run_sync(self._generate_sync, requests)
        return [Generation(r.tokens, r.logprobs, r.finish or "length", version) for r in rows]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        state = safetensors.torch.load(safetensors_bytes)
        async with self._lock:
            await anyio.to_thread.run_sync(self._load_sync, state)
            self.version = version

    def export_weights(self) -> bytes:
        """The model's weights as safetensors bytes (tied tensors once), as ``load_weights`` takes."""
        seen: set[int] = set()
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous().cpu()
        return safetensors.torch.save(state)

    # -- blocking parts (worker thread) ---------------------------------------------------------

    def _load_sync(self, state: dict[str, torch.Tensor]) -> None:
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = set(result.missing_keys) - tied
        if missing or result.unexpected_keys:
            raise ValueError(
                f"weights do not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )

    @torch.inference_mode()
    def _generate_sync(self, requests: list[GenRequest]) -> list[_Row]:
        rows = [_Row(r) for r in requests]
        for row in rows:
            if row.req.max_new_tokens <= 0:
                row.finish = "length"
        if all(r.finish for r in rows):
            return rows
        width = max(len(r.prompt_tokens) for r in requests)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(requests):
            if r.prompt_tokens:
                ids[i, width - len(r.prompt_tokens) :] = torch.tensor(r.prompt_tokens)
                mask[i, width - len(r.prompt_tokens) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        temps = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=self.device)
        own = [self._generator(r.seed) for r in requests]
        while True:
            tokens, logprobs = self._sample(logits, temps, own)
            for i, row in enumerate(rows):
                if row.finish is None:
                    self._append(row, int(tokens[i]), float(logprobs[i]))
            if all(r.finish for r in rows):
                return rows
            step = torch.tensor(
                [[r.tokens[-1] if r.tokens else self.pad_id] for r in rows], device=self.device
            )
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(step, mask, positions, cache)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A request's own generator (its ``seed``), or None to sample from the engine's."""
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def _sample(
        self, logits: torch.Tensor, temps: torch.Tensor, own: list[torch.Generator | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        greedy = temps <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        if all(g is None for g in own):  # one draw for the batch from the engine's generator
            sampled = torch.multinomial(probs, 1, generator=self._rng).squeeze(1)
        else:  # a seeded row draws from its own generator only, so the batch cannot change its tokens
            sampled = torch.cat(
                [torch.multinomial(probs[i], 1, generator=g or self._rng) for i, g in enumerate(own)]
            )
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        row.tokens.append(token)
        row.logprobs.append(logprob)
        req = row.req
        if req.stop_token_ids and token in req.stop_token_ids:
            row.finish = "stop"
        elif req.stop_strings and _hits_stop_string(self.tokenizer, row.tokens, req.stop_strings):
            row.finish = "stop"
        elif len(row.tokens) >= req.max_new_tokens:
            row.finish = "length"


def _hits_stop_string(tokenizer: Any, tokens: list[int], stops: list[str]) -> bool:
    """Whether the newest token completes a stop string (decoding only a short tail)."""
    window = max(len(s) for s in stops) + 1
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    prev = tokenizer.decode(tokens[-window:-1], skip_special_tokens=False) if len(tokens) > 1 else ""
    return any(s in tail and s not in prev for s in stops)
