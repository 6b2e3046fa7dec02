"""Tiny checkpoints of several model families, built offline: random weights, a locally trained
tokenizer with the family's special tokens, and a chat template modelled on the family's own.

They exist to prove that nothing in rollstream assumes the embedded Qwen2 format (tests run whole
episodes through each) and to measure generation and training per architecture
(``just bench-models``). Nothing is downloaded; the caller supplies the tokenizer's training text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_harness import templates
from agent_harness.tokenizer import SPECIAL_TOKENS, train_tokenizer

SMALL_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True, slots=True)
class Architecture:
    """A model family: its transformers config class, special tokens and chat template."""

    name: str
    config_class: str  # a transformers ``*Config`` class name
    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None
    template: str
    stops: tuple[str, ...] = ()  # extra end-of-generation tokens for the generation config
    config: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "qwen2", "Qwen2Config", SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", None, templates.QWEN25
        ),
        Architecture(
            "llama",
            "LlamaConfig",
            (
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ),
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|begin_of_text|>",
            templates.LLAMA31,
            stops=("<|eom_id|>",),
        ),
        Architecture(
            "mistral",
            "MistralConfig",
            (
                "<unk>",
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ),
            "</s>",
            "<unk>",
            "<s>",
            templates.MISTRAL_V03,
            config={"sliding_window": None},
        ),
    )
}


def create_policy(
    path: Path, arch: str, corpus: Iterable[str], *, seed: int = 0, shape: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint of architecture ``arch`` at ``path`` (skipped if ``config.json`` exists)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = ARCHITECTURES[arch]
    path = Path(path)
    if (path / "config.json").exists():
        return path
    tok = train_tokenizer(
        corpus,
        vocab_size=768,
        special_tokens=spec.specials,
        eos=spec.eos,
        pad=spec.pad,
        bos=spec.bos,
        chat_template=spec.template,
    )
    ids = tok.convert_tokens_to_ids
    config = getattr(transformers, spec.config_class)(
        vocab_size=len(tok),
        **(shape or SMALL_SHAPE),
        **spec.config,
        tie_word_embeddings=True,
        bos_token_id=ids(spec.bos or spec.pad),
        eos_token_id=ids(spec.eos),
        pad_token_id=ids(spec.pad),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()  # type: ignore[no-untyped-call]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=[ids(spec.eos), *(ids(s) for s in spec.stops)], pad_token_id=ids(spec.pad)
    ).save_pretrained(path)
    return path
