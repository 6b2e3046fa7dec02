"""Checkpoints: a Hugging Face model directory plus optimiser state and ``state.json``, written
atomically (``consumers.lake.durable.atomic_write``: temporary directory, fsync, rename, fsync of
the parent), so a directory with ``state.json`` is complete.

Layout: ``<root>/step-<step:08d>/{config.json, model.safetensors, ..., optimizer.pt, state.json}``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import torch

from consumers.lake.durable import atomic_write

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# Tokenizer files copied from the checkpoint the trainer started from, so every checkpoint loads alone.
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*")


class CheckpointState(msgspec.Struct, frozen=True, kw_only=True):
    """The trainer's counters at the checkpoint, and whatever the worker wants back on resume."""

    version: int
    step: int
    extra: dict[str, Any] = {}
    time: float = 0.0


def checkpoint_path(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return root / f"step-{step:08d}"


def read_state(directory: Path) -> CheckpointState:
    """The ``state.json`` of a checkpoint directory."""
    return msgspec.json.decode((directory / STATE_FILE).read_bytes(), type=CheckpointState)


def complete_checkpoints(root: Path) -> Iterator[tuple[CheckpointState, Path]]:
    """Every complete checkpoint under ``root`` with its state, in no particular order.

    Temporary directories start with a dot and are skipped; so is a directory whose ``state.json``
    is missing or unreadable.
    """
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.name.startswith(".") or not (d / STATE_FILE).is_file():
            continue
        try:
            yield read_state(d), d
        except (msgspec.DecodeError, OSError):
            continue


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint under ``root`` with the highest (step, version), if any."""
    found = [((state.step, state.version), d) for state, d in complete_checkpoints(root)]
    return max(found, key=lambda item: item[0])[1] if found else None


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy tokenizer files from ``source`` to ``target`` (those ``target`` does not have)."""
    for pattern in TOKENIZER_GLOBS:
        for f in source.glob(pattern):
            if f.is_file() and not (target / f.name).exists():
                shutil.copy2(f, target / f.name)


def write_checkpoint(
    target: Path,
    model: Any,  # a transformers PreTrainedModel
    optimizer: torch.optim.Optimizer,
    state: CheckpointState,
    *,
    tokenizer_source: Path | None = None,
) -> Path:
    """Write a complete checkpoint at ``target``, replacing any previous one there atomically."""

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, tmp)
        stamped = msgspec.structs.replace(state, time=state.time or time.time())
        (tmp / STATE_FILE).write_bytes(msgspec.json.encode(stamped))

    atomic_write(target, fill)
    return target


def load_optimizer_state(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimiser state saved in a checkpoint directory."""
    state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
