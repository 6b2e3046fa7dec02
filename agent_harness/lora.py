"""LoRA adapters as policy versions: the learner trains low-rank adapters (``peft``) on a frozen
base policy and publishes only the adapter tensors; engines merge them into the base they hold.

An adapter travels as safetensors bytes holding peft's adapter state (``...q_proj.lora_A.weight``,
``...q_proj.lora_B.weight``, as ``peft.get_peft_model_state_dict`` names them) plus one scalar
tensor ``rollstream.lora_scale`` (``alpha / r``), so a receiver needs no adapter config. Merging
is ``W = W_base + scale · B @ A`` per targeted linear layer, always from the base policy (every
version's adapter is relative to the same base), which is what ``peft``'s ``merge_and_unload``
computes. ``AdapterEngine`` wraps any in-process engine: full weights pass through, adapters are
merged first.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from agent_harness.engine import Generation, GenRequest, InferenceEngine
from agent_harness.settings import LoraSettings

SCALE_KEY = "rollstream.lora_scale"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


def peft_model(model: Any, settings: LoraSettings) -> Any:
    """``model`` with fresh adapters on ``settings.target_modules`` (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
    )
    with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def adapter_bytes(model: Any, scale: float) -> bytes:
    """The adapter tensors of a peft ``model`` (and their scale) as safetensors bytes."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    state[SCALE_KEY] = torch.tensor([scale], dtype=torch.float32)
    return safetensors.torch.save(state, metadata={"format": "pt", "rollstream": "lora"})


def is_adapter(data: bytes) -> bool:
    """Whether safetensors ``data`` is an adapter (reads only its header)."""
    if len(data) < 8:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return False
    return SCALE_KEY in header


def merged_state(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` with every adapted weight replaced by ``W + scale · B @ A`` (others shared)."""
    scale = float(adapter[SCALE_KEY].item())
    out = dict(base)
    for key, a in adapter.items():
        if not key.endswith(_A):
            continue
        module = key[: -len(_A)].removeprefix(_PREFIX)
        b = adapter[key[: -len(_A)] + _B]
        target = f"{module}.weight"
        if target not in base:
            raise ValueError(f"the adapter targets {target}, which the base policy lacks")
        w = base[target]
        out[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


class AdapterEngine:
    """An in-process engine that takes full weights or adapters (merged into the base policy)."""

    def __init__(self, inner: InferenceEngine, base_dir: Path) -> None:
        self.inner = inner
        self.base_dir = Path(base_dir)
        self._base: dict[str, torch.Tensor] | None = None  # read when the first adapter arrives

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        return await self.inner.generate(requests)

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        if is_adapter(safetensors_bytes):
            if self._base is None:
                self._base = safetensors.torch.load_file(str(self.base_dir / "model.safetensors"))
            adapter = safetensors.torch.load(safetensors_bytes)
            safetensors_bytes = safetensors.torch.save(merged_state(self._base, adapter))
        await self.inner.load_weights(safetensors_bytes, version)
