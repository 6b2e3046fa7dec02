"""The policy model: which checkpoint, in which dtype, on which device, with which tool format.

``[policy]`` in ``rollstream.toml``. The learner and the torch engine load the model through
``load_model`` so that both run the same function of the same weights; ``check_policy`` is what the
configuration runs before anything starts, so a bad path, a missing device or a checkpoint without a
chat template is one sentence naming the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent_harness.settings import LoraSettings

DType = Literal["float32", "bfloat16", "float16"]
ToolFormatName = Literal["auto", "hermes", "llama3_json", "mistral"]


class PolicySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The policy checkpoint and how the learner and the torch engine load it."""

    path: Annotated[
        str,
        msgspec.Meta(
            description="A Hugging Face checkpoint directory (config, weights, tokenizer with a chat "
            "template); empty = the embedded tiny model `init-policy` creates under state_dir."
        ),
    ] = ""
    dtype: Annotated[
        DType, msgspec.Meta(description="Weights dtype of the learner and the torch engine.")
    ] = "float32"
    device: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(cpu|cuda|cuda:[0-9]+|auto)$",
            description="cpu, cuda, cuda:N or auto (cuda if available, else cpu), for the learner "
            "and the torch engine.",
        ),
    ] = "cpu"
    gradient_checkpointing: Annotated[
        bool, msgspec.Meta(description="Recompute activations in the backward pass (less memory, slower).")
    ] = False
    attn_implementation: Annotated[
        str,
        msgspec.Meta(
            description="Passed to from_pretrained (eager, sdpa, flash_attention_2); empty = default."
        ),
    ] = ""
    tool_format: Annotated[
        ToolFormatName,
        msgspec.Meta(
            description="How the policy writes tool calls: hermes (<tool_call>), llama3_json, mistral "
            "([TOOL_CALLS]); auto = detected from the chat template."
        ),
    ] = "auto"
    lora: Annotated[
        LoraSettings | None,
        msgspec.Meta(
            description=(
                "Train LoRA adapters ({r, alpha, target_modules}) on the frozen base policy instead of "
                "every weight; only the adapters travel to the engines, which merge them. Needs "
                "learner.warm_start_steps = 0 (the warm start trains full weights)."
            )
        ),
    ] = None


def resolve_device(name: str) -> Any:
    """The ``torch.device`` that ``name`` means (``auto``: the first GPU if there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def torch_dtype(name: DType) -> Any:
    import torch

    dtypes: dict[str, torch.dtype] = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    return dtypes[name]


def load_model(checkpoint_dir: Path, settings: PolicySettings) -> Any:
    """The causal LM at ``checkpoint_dir`` in ``settings.dtype`` on ``settings.device`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(settings.dtype)}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
    model.to(resolve_device(settings.device))
    model.train(False)
    return model


def chat_template_of(checkpoint_dir: Path) -> str | None:
    """The chat template a checkpoint's tokenizer carries (``chat_template.jinja`` or the
    ``tokenizer_config.json`` field), read without loading the tokenizer; None if it has none."""
    jinja = checkpoint_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = checkpoint_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or named.get("tool_use")
    return template if isinstance(template, str) and template else None


def check_policy(settings: PolicySettings, checkpoint_dir: Path) -> str | None:
    """Why the policy cannot load (one sentence naming the key), or None. Only an explicit
    ``policy.path`` is checked on disk: the embedded default is created by ``init-policy``."""
    if settings.path:
        problem = _check_path(checkpoint_dir)
        if problem:
            return problem
    return _check_device(settings.device)


def _check_path(path: Path) -> str | None:
    if not path.is_dir():
        return f"policy.path {str(path)!r} is not a directory; point it at a Hugging Face checkpoint."
    if not os.access(path, os.R_OK | os.X_OK) or not (path / "config.json").is_file():
        return f"policy.path {str(path)!r} has no readable config.json; is it a Hugging Face checkpoint?"
    try:
        template = chat_template_of(path)
    except (OSError, ValueError) as exc:
        return f"policy.path {str(path)!r}: its tokenizer files are unreadable ({exc})."
    if template is None:
        return (
            f"policy.path {str(path)!r}: the tokenizer has no chat template; use an instruct/chat "
            "checkpoint or add chat_template.jinja to it."
        )
    return None


def _check_device(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"policy.device {device!r}: no CUDA device here; use cpu or auto."
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"policy.device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here."
    return None
