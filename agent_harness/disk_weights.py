"""Policy versions as checkpoint directories on a disk that inference servers can read.

Server engines (sglang, any OpenAI-compatible server, ``rollstream serve``) load weights from a
path, not from bytes: the rollout side writes ``<weights_dir>/v<version:06d>/`` (the policy's
config and tokenizer files plus ``model.safetensors``, or ``adapter_model.safetensors`` for a LoRA
adapter) once, then asks each server to load it. Several rollout processes may write the same
version at once: each writes a private temporary directory and renames it into place; the first
rename wins and the others discard theirs. Old versions are pruned, keeping the newest few.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

# Files a server needs beside the weights to load the directory as a Hugging Face checkpoint.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
)
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
KEEP_VERSIONS = 4
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


def version_dir(weights_dir: Path, version: int) -> Path:
    """Where version ``version`` lives under ``weights_dir``."""
    return weights_dir / f"v{version:06d}"


def write_version(
    weights_dir: Path, version: int, data: bytes, *, source_dir: Path, file_name: str = WEIGHTS_FILE
) -> Path:
    """Write version ``version`` (safetensors ``data`` plus ``source_dir``'s config and tokenizer
    files) unless it is there already; prune old versions; returns its directory."""
    target = version_dir(weights_dir, version)
    if (target / file_name).exists():
        return target
    weights_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights_dir / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name in CHECKPOINT_FILES:
            if (source_dir / name).exists():
                shutil.copy2(source_dir / name, tmp / name)
        with open(tmp / file_name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            tmp.rename(target)
        except OSError:  # another writer renamed first: its copy is the same version
            if not (target / file_name).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(weights_dir, keep_from=version - KEEP_VERSIONS + 1)
    return target


def prune(weights_dir: Path, *, keep_from: int) -> None:
    """Remove version directories older than ``keep_from``."""
    for d in weights_dir.iterdir():
        m = _VERSION_DIR.match(d.name)
        if m and int(m.group(1)) < keep_from:
            shutil.rmtree(d, ignore_errors=True)


def read_weights(path: Path) -> tuple[bytes, bool]:
    """The safetensors bytes a reload names: a file, or a directory holding ``model.safetensors``
    (full weights) or ``adapter_model.safetensors`` (a LoRA adapter); and whether it is an adapter."""
    if path.is_file():
        return path.read_bytes(), path.name == ADAPTER_FILE
    if (path / WEIGHTS_FILE).is_file():
        return (path / WEIGHTS_FILE).read_bytes(), False
    if (path / ADAPTER_FILE).is_file():
        return (path / ADAPTER_FILE).read_bytes(), True
    raise FileNotFoundError(f"{path} holds neither {WEIGHTS_FILE} nor {ADAPTER_FILE}")
