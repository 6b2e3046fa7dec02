"""Shared pieces of the harness tests: the tiny policy, a recording engine, exact-accounting checks,
and helpers to run episodes in the real sandbox (``sandbox_client``: real sandboxd, real Docker)."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
import pytest

from agent_harness.engine import Generation, GenRequest, InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.policy_init import create_tiny_policy
from agent_harness.settings import HarnessSettings
from producers.families.files import corpus
from sandboxd.client import SandboxClient
from schemas.arrays import unpack_tokens
from schemas.task import TaskSample
from schemas.trajectory import Trajectory

T = TypeVar("T")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", corpus(seed=0), seed=0)


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


async def run_concurrently(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int = 3) -> list[T]:
    """Await the jobs, at most ``limit`` at a time (the test sandboxd holds 3 sandboxes); results
    in the jobs' order."""
    limiter = anyio.CapacityLimiter(limit)
    results: dict[int, T] = {}

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await jobs[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    return [results[i] for i in range(len(jobs))]


async def passes(sandbox: SandboxClient, sandbox_id: str, commands: Sequence[str]) -> bool:
    """Whether every command exits 0 in the sandbox (run one after another, as a verifier does)."""
    return all([(await sandbox.exec(sandbox_id, c)).exit_code == 0 for c in commands])


async def verified_episode(
    sample: TaskSample,
    *,
    engine: InferenceEngine,
    sandbox: SandboxClient,
    settings: HarnessSettings,
    **options: Any,
) -> tuple[Trajectory, bool]:
    """Run one episode in a real sandbox, run the task's verify commands in the sandbox the episode
    left open (the loop never closes it: the reward worker verifies there), then close it."""
    traj = await run_episode(sample, engine=engine, sandbox=sandbox, settings=settings, **options)
    if not traj.sandbox_id:
        return traj, False
    try:
        return traj, await passes(sandbox, traj.sandbox_id, sample.task.verify)
    finally:
        with anyio.move_on_after(30, shield=True):
            await sandbox.close(traj.sandbox_id)


def remove_container(traj_label: str, how: str = "kill") -> None:
    """``docker kill`` (or ``docker rm -f``) the one container labelled with the episode's id."""
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=rollstream.traj={traj_label}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(ids) == 1, ids
    argv = ["docker", "kill"] if how == "kill" else ["docker", "rm", "-f"]
    subprocess.run([*argv, ids[0]], capture_output=True, check=True)
