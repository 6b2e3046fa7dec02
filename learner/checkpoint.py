"""Checkpoints: a Hugging Face model directory plus optimiser state and ``state.json``, written
atomically (temporary directory, fsync, rename), so a directory with ``state.json`` is complete.

Layout: ``<root>/step-<step:08d>/{config.json, model.safetensors, ..., optimizer.pt, state.json}``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import torch

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


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint under ``root`` with the highest (step, version), if any.

    Temporary directories start with a dot and are skipped; so is a directory whose ``state.json``
    is missing or unreadable.
    """
    best: tuple[int, int, Path] | None = None
    if not root.is_dir():
        return None
    for d in root.iterdir():
        if d.name.startswith(".") or not (d / STATE_FILE).is_file():
            continue
        try:
            state = read_state(d)
        except (msgspec.DecodeError, OSError):
            continue
        if best is None or (state.step, state.version) > best[:2]:
            best = (state.step, state.version, d)
    return None if best is None else best[2]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if tokenizer_source is not None and tokenizer_source.resolve() != tmp.resolve():
            copy_tokenizer_files(tokenizer_source, tmp)
        stamped = msgspec.structs.replace(state, time=state.time or time.time())
        (tmp / STATE_FILE).write_bytes(msgspec.json.encode(stamped))
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_optimizer_state(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimiser state saved in a checkpoint directory."""
    state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
