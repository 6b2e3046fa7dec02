"""Shared pieces of the harness tests: the tiny policy, a fake sandbox, a recording engine.

The fake sandbox understands exactly the shell the built-in tasks use (printf/echo redirection,
cat, test); tests that need the real thing use ``sandbox_client`` (real sandboxd, real Docker).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_harness.engine import Generation, GenRequest, InferenceEngine
from agent_harness.policy_init import create_tiny_policy
from sandboxd.errors import SandboxUnavailable
from schemas.arrays import unpack_tokens
from schemas.sandbox import Created, ExecResult
from schemas.trajectory import Trajectory


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", seed=0)


class FakeSandbox:
    """An in-memory stand-in for ``SandboxClient`` (create/exec/close) with failure injection."""

    def __init__(self, *, fail_on_exec: int | None = None, fail_create: bool = False) -> None:
        self.files: dict[str, dict[str, str]] = {}
        self.execs = 0
        self.fail_on_exec = fail_on_exec
        self.fail_create = fail_create
        self.closed: list[str] = []

    async def create(
        self, environment: str = "base", *, labels: dict[str, str] | None = None, ttl_s: float = 900.0
    ) -> Created:
        if self.fail_create:
            raise SandboxUnavailable("no sandboxd answered")
        sid = f"sbx-{len(self.files)}"
        self.files[sid] = {}
        return Created(sandbox_id=sid, owner="fake", image=environment, startup_ms=0.0)

    async def close(self, sandbox_id: str) -> None:
        self.closed.append(sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = 10.0,
        cwd: str = "/work",
        max_output_bytes: int = 16384,
    ) -> ExecResult:
        self.execs += 1
        if self.fail_on_exec is not None and self.execs >= self.fail_on_exec:
            raise SandboxUnavailable("sandbox container vanished")
        files = self.files[sandbox_id]
        name = lambda p: p.removeprefix("/work/")  # noqa: E731
        if m := re.fullmatch(r"(?:printf '%s\\n'|echo) (.+?) > (\S+)", command):
            files[name(m.group(2))] = " ".join(shlex.split(m.group(1))) + "\n"
            return ExecResult(exit_code=0, stdout="", stderr="")
        if m := re.fullmatch(r"cat (\S+)", command):
            if name(m.group(1)) in files:
                return ExecResult(exit_code=0, stdout=files[name(m.group(1))], stderr="")
            return ExecResult(
                exit_code=1, stdout="", stderr=f"cat: {m.group(1)}: No such file or directory\n"
            )
        if m := re.fullmatch(r"test -f (\S+)", command):
            return ExecResult(exit_code=0 if name(m.group(1)) in files else 1, stdout="", stderr="")
        if m := re.fullmatch(r'test "\$\(cat (\S+)\)" = "(\w+)"', command):
            ok = files.get(name(m.group(1)), "").rstrip("\n") == m.group(2)
            return ExecResult(exit_code=0 if ok else 1, stdout="", stderr="")
        if command == "sleep 100":
            return ExecResult(exit_code=-1, stdout="", stderr="", timed_out=True)
        if command == "yes":
            return ExecResult(exit_code=0, stdout="y\n" * 5000, stderr="", truncated=True)
        return ExecResult(
            exit_code=127,
            stdout="",
            stderr=f"sh: 1: {command.split()[0] if command.split() else ''}: not found\n",
        )


class RecordingEngine:
    """Wraps an engine and records every (prompt fed, tokens generated) pair."""

    def __init__(self, inner: InferenceEngine) -> None:
        self.inner = inner
        self.calls: list[tuple[list[int], list[int]]] = []

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def version(self) -> int:
        return self.inner.version

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        gens = await self.inner.generate(requests)
        for r, g in zip(requests, gens, strict=True):
            self.calls.append((list(r.prompt_tokens), list(g.tokens)))
        return gens

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        await self.inner.load_weights(safetensors_bytes, version)


def sequence_of(traj: Trajectory) -> list[int]:
    """prompt + Σ (action + observation), as the learner rebuilds it."""
    parts = [unpack_tokens(traj.prompt_tokens)]
    for c in traj.chunks:
        parts += [unpack_tokens(c.action_tokens), unpack_tokens(c.obs_tokens)]
    return [int(t) for t in np.concatenate(parts)]


def assert_exact_accounting(traj: Trajectory, calls: list[tuple[list[int], list[int]]]) -> None:
    """Every prompt fed is the rebuilt prefix, and the last fed + generated is the whole sequence."""
    assert len(calls) == len(traj.chunks)
    seq = sequence_of(traj)
    for (fed, generated), chunk in zip(calls, traj.chunks, strict=True):
        assert seq[: len(fed)] == fed
        assert list(unpack_tokens(chunk.action_tokens)) == generated
    if calls:
        fed, generated = calls[-1]
        assert fed + generated == seq
    else:
        assert seq == list(unpack_tokens(traj.prompt_tokens))
