"""Which weights an evaluation runs: ``latest``, ``v<N>`` or a checkpoint directory.

Versions come from the learner's checkpoints (``<state>/checkpoints/<run>/step-*/state.json``):
the learner writes one whenever it publishes a version, so ``v<N>`` is the earliest checkpoint of
version N (later ones of the same version hold further, unpublished steps). ``v0`` without a
checkpoint is the base policy (``<state>/policy/base``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from learner.checkpoint import STATE_FILE, complete_checkpoints, read_state

VERSION = re.compile(r"^v(\d+)$")


class PolicyError(ValueError):
    """A policy that cannot be found; the message lists what can."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A checkpoint directory to load, the version it holds and how the user named it."""

    label: str
    directory: Path
    version: int


def versions(checkpoints: Path) -> dict[int, Path]:
    """Each version with a complete checkpoint under ``checkpoints`` -> its earliest checkpoint."""
    found: dict[int, tuple[int, Path]] = {}
    for state, d in complete_checkpoints(checkpoints):
        if state.version not in found or state.step < found[state.version][0]:
            found[state.version] = (state.step, d)
    return {v: d for v, (_, d) in sorted(found.items())}


def resolve(spec: str, *, checkpoints: Path, base: Path) -> Policy:
    """The policy ``spec`` names (``latest``, ``v<N>``, or a Hugging Face checkpoint directory)."""
    known = versions(checkpoints)
    if spec == "latest":
        if not known:
            return Policy(label=spec, directory=base, version=0)
        v = max(known)
        return Policy(label=spec, directory=known[v], version=v)
    if m := VERSION.match(spec):
        v = int(m.group(1))
        if v in known:
            return Policy(label=spec, directory=known[v], version=v)
        if v == 0:
            return Policy(label=spec, directory=base, version=0)
        have = ", ".join(f"v{x}" for x in known) or "none"
        raise PolicyError(f"no checkpoint of version {v} under {checkpoints} (versions: {have})")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise PolicyError(
            f"--policy {spec!r}: use latest, v<N>, or a checkpoint directory (with config.json)"
        )
    version = read_state(path).version if (path / STATE_FILE).is_file() else 0
    return Policy(label=spec, directory=path, version=version)
