"""Create the tiny default policy: a locally trained tokenizer and a random Qwen2 checkpoint.

The tokenizer's training text comes from the caller (the command line passes the ``files`` task
family's corpus), so the harness knows no task family.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from agent_harness.tokenizer import train_tokenizer

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
}


def create_tiny_policy(path: Path, corpus: Iterable[str], *, seed: int = 0) -> Path:
    """Write a Hugging Face checkpoint directory at ``path`` (skipped if ``config.json`` exists):
    a tokenizer trained on ``corpus`` (read only when the checkpoint is made) and random weights
    drawn with ``seed``.

    It loads back offline with ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``. The
    directory is built next to ``path`` and renamed into place, so readers never see half of it.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()  # type: ignore[no-untyped-call]
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(  # type: ignore[no-untyped-call]
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</tool_call>")],
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)
        if (path / "config.json").exists():  # someone else finished first
            return path
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
