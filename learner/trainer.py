"""The trainer: one padded forward/backward per optimiser step, weights as safetensors bytes,
atomic checkpoints. Blocking only; the learner worker calls it through ``anyio.to_thread``.

The model runs in eval mode (no dropout) so that ``π_θ`` is the same function the inference engine
samples from and on-policy ratios are exactly 1; gradients flow as usual. It loads with ``[policy]``'s
dtype, device and attention (``agent_harness.model.load_model``, as the torch engine does); with
gradient checkpointing it runs in train mode (which checkpointing needs) with every dropout at 0.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from agent_harness.lora import adapter_bytes, peft_model
from agent_harness.model import PolicySettings, load_model
from learner.batch import Batch, build_batch
from learner.checkpoint import (
    CheckpointState,
    checkpoint_path,
    latest_checkpoint,
    load_optimizer_state,
    read_state,
    write_checkpoint,
)
from learner.grpo import grpo_terms, sft_terms
from learner.ipa import LossStats, LossTerms, ipa_terms, token_logprobs
from learner.settings import LearnerSettings, LossName
from schemas.trajectory import ScoredTrajectory

LossFn = Callable[[torch.Tensor, Batch, LearnerSettings], LossTerms]
LOSSES: dict[LossName, LossFn] = {"ipa": ipa_terms, "grpo": grpo_terms, "sft": sft_terms}


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one ``train_step`` did. ``skipped``: nothing trainable or a non-finite gradient norm,
    so the optimiser did not step and ``step`` did not advance."""

    step: int  # the trainer's step counter after this call
    loss: float
    grad_norm: float
    samples: int
    mean_reward: float
    skipped: bool
    per_sample_loss: list[float] = field(default_factory=list)
    stats: LossStats = field(default_factory=lambda: LossStats(loss=0.0, tokens=0.0))


class Trainer:
    """AdamW on a causal LM loaded from a Hugging Face checkpoint directory (``policy`` says the
    dtype, device and attention; float32 on the CPU by default)."""

    def __init__(
        self,
        checkpoint_dir: Path,
        settings: LearnerSettings,
        policy: PolicySettings | None = None,
        *,
        base_dir: Path | None = None,
    ) -> None:
        """``policy.lora``: train adapters on the frozen model at ``checkpoint_dir`` (or resume the
        adapter checkpoint there, on the base policy at ``base_dir``)."""
        torch.manual_seed(settings.seed)
        self.settings = settings
        self.policy = policy or PolicySettings()
        self.source_dir = Path(checkpoint_dir)
        self.lora = self.policy.lora
        self.model: Any = _load_model(self.source_dir, self.policy, base_dir)  # eval mode: no dropout
        self.device = next(self.model.parameters()).device
        if self.policy.gradient_checkpointing:
            _checkpoint_activations(self.model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
        )
        pad = self.model.config.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else 0
        self._version = 0  # the policy version N: only next_version / adopt_version move it
        self.step = 0  # optimiser steps taken
        self.resumed_extra: dict[str, Any] = {}  # ``extra`` of the checkpoint resumed from, if any

    # -- the policy version ----------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The policy version ``N`` of the weights this trainer holds."""
        return self._version

    def next_version(self) -> int:
        """Advance ``N`` by one, for a weights publication; returns the new version."""
        self._version += 1
        return self._version

    def adopt_version(self, version: int) -> None:
        """Continue from ``version`` (announced by a predecessor); versions never go back."""
        if version < self._version:
            raise ValueError(f"policy version {version} is older than the trainer's {self._version}")
        self._version = version

    # -- training -------------------------------------------------------------------------------

    def train_step(self, samples: Sequence[ScoredTrajectory], *, loss: LossName | None = None) -> StepResult:
        """One optimiser step on ``samples`` with ``loss`` (default ``settings.loss``)."""
        name = loss or self.settings.loss
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; use one of {sorted(LOSSES)}")
        batch = build_batch(
            samples,
            pad_id=self.pad_id,
            gamma=self.settings.gamma,
            failure_reward=self.settings.failure_reward,
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._accumulate(batch, LOSSES[name])
        mean_reward = sum(s.reward for s in samples) / len(samples)
        stats = LossStats.merge([t.stats for t in terms])
        per_sample = _per_sample(torch.cat([t.per_sample for t in terms]), batch.row_sample, len(samples))
        loss_value = stats.loss
        params = [p for p in self.model.parameters() if p.grad is not None]
        if stats.tokens == 0.0 or not params:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(self.step, loss_value, 0.0, len(samples), mean_reward, True, per_sample, stats)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip).item())
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            self.step, loss_value, grad_norm, len(samples), mean_reward, skipped, per_sample, stats
        )

    def _accumulate(self, batch: Batch, loss_fn: LossFn) -> list[LossTerms]:
        """Forward and backward each micro-batch; each loss weighs ``1 / micro-batches``."""
        n_micro = min(self.settings.grad_accum, batch.size)
        bounds = [round(i * batch.size / n_micro) for i in range(n_micro + 1)]
        out: list[LossTerms] = []
        for start, stop in itertools.pairwise(bounds):
            micro = batch.rows(start, stop).to(self.device)
            logits = self.model(
                input_ids=micro.input_ids, attention_mask=micro.attention_mask, use_cache=False
            ).logits
            terms = loss_fn(token_logprobs(logits, micro.input_ids), micro, self.settings)
            torch.autograd.backward(terms.loss / n_micro)
            out.append(terms)
        return out

    def publish_due(self) -> bool:
        """Whether the current step should publish weights (every ``publish_every`` steps)."""
        return self.step > 0 and self.step % self.settings.publish_every == 0

    def checkpoint_due(self) -> bool:
        """Whether the current step should write a checkpoint (every ``checkpoint_every`` steps)."""
        return self.step > 0 and self.step % self.settings.checkpoint_every == 0

    # -- weights and checkpoints ----------------------------------------------------------------

    def weights_bytes(self) -> bytes:
        """The full state dict as safetensors bytes (with LoRA: the adapters only, ``agent_harness.lora``).

        Tied tensors (``lm_head.weight`` sharing ``embed_tokens.weight``) are written under both
        names as separate copies, so ``model.load_state_dict(safetensors.torch.load(b), strict=False)``
        restores any model of the same class, tied or not.
        """
        if self.lora is not None:
            return adapter_bytes(self.model, self.lora.scale)
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t.contiguous()
            seen.add(ptr)
        return safetensors.torch.save(tensors, metadata={"format": "pt"})

    def save_checkpoint(
        self,
        dir: Path,
        *,
        version: int | None = None,
        step: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the model (HF format), optimiser state and ``state.json`` atomically at ``dir``."""
        state = CheckpointState(
            version=self.version if version is None else version,
            step=self.step if step is None else step,
            extra=extra or {},
        )
        return write_checkpoint(dir, self.model, self.optimizer, state, tokenizer_source=self.source_dir)

    def checkpoint(self, root: Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint the current version and step at ``<root>/step-<step>``."""
        return self.save_checkpoint(checkpoint_path(root, self.step), extra=extra)

    @classmethod
    def resume(
        cls,
        checkpoint_root: Path,
        base_checkpoint: Path,
        settings: LearnerSettings,
        policy: PolicySettings | None = None,
    ) -> Trainer:
        """The trainer of the latest complete checkpoint under ``checkpoint_root``, or a fresh one
        from ``base_checkpoint`` at version 0, step 0."""
        latest = latest_checkpoint(checkpoint_root)
        if latest is None:
            return cls(base_checkpoint, settings, policy)
        trainer = cls(latest, settings, policy, base_dir=base_checkpoint)
        load_optimizer_state(latest, trainer.optimizer)
        for group in trainer.optimizer.param_groups:  # the configured rate wins over the saved one
            group["lr"] = settings.lr
            group["weight_decay"] = settings.weight_decay
        state = read_state(latest)
        trainer._version, trainer.step = state.version, state.step
        trainer.resumed_extra = state.extra
        return trainer


def _checkpoint_activations(model: Any) -> None:
    """Gradient checkpointing, which transformers applies in train mode only: train mode with every
    dropout probability at 0, so the function stays the one the engine samples from."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _load_model(directory: Path, policy: PolicySettings, base_dir: Path | None) -> Any:
    """The model at ``directory`` (``policy``'s dtype, device, attention; eval mode); with
    ``policy.lora``, wrapped in adapters (fresh, or the adapter checkpoint at ``directory`` over
    the base at ``base_dir``)."""
    if policy.lora is None:
        return load_model(directory, policy)
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_model(base_dir or directory, policy)
        with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(base, directory, is_trainable=True)
    return peft_model(load_model(directory, policy), policy.lora)


def _per_sample(per_row: torch.Tensor, row_sample: list[int], n: int) -> list[float]:
    """Per-row losses folded to one per sample (the mean over its segments' rows)."""
    per_row = per_row.detach().float().cpu()  # the learner's device and dtype may differ
    index = torch.tensor(row_sample, dtype=torch.long)
    sums = torch.zeros(n, dtype=per_row.dtype).index_add_(0, index, per_row)
    counts = torch.zeros(n, dtype=per_row.dtype).index_add_(0, index, torch.ones_like(per_row))
    return (sums / counts.clamp(min=1)).tolist()
