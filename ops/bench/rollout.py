"""Rollout benchmark: episodes/s and tokens/s of one rollout worker by concurrency, and the harness's
own overhead per chunk as a fraction of generation time.

Real parts: a nats-server, an in-process sandboxd on the local Docker engine (one real sandbox per
episode), the tiny policy in a ``TorchEngine`` (CPU, one thread), the real agent loop
(``agent_harness.loop.run_episode``) on the built-in task family. Each concurrency level runs with
the ``Batcher`` (turns of concurrent episodes share one forward batch) and, for comparison, without
it (every turn a batch of one; the engine lock serialises them).

Time accounting per episode: time inside ``engine.generate`` (including waiting for a batch),
time inside sandbox calls (create, setup, commands), and the rest: the harness's own work
(tokenising, parsing, building observations and records) plus, at concurrency > 1, waiting for the
event loop while other episodes run. Overhead per chunk = rest / chunks; the fraction divides it by
generation time per chunk. Sandboxes are closed after the timed window.

Run with ``python -m ops.bench.rollout [--concurrency 1,4,8] [--episodes-per-slot 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
from rich.console import Console
from rich.table import Table

from agent_harness.batcher import Batcher
from agent_harness.engine import Generation, GenRequest, InferenceEngine
from agent_harness.loop import run_episode
from agent_harness.policy_init import create_tiny_policy
from agent_harness.settings import HarnessSettings
from agent_harness.torch_engine import TorchEngine
from producers.families.files import builtin_tasks, corpus
from sandboxd import daemon
from sandboxd.client import SandboxClient
from sandboxd.envhub import ensure_image
from sandboxd.settings import SandboxdSettings
from schemas.arrays import unpack_tokens
from schemas.sandbox import Created, ExecResult
from schemas.task import TaskSample
from schemas.trajectory import Trajectory
from streams.server import NatsServer

_clock: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("bench_clock")


def _charge(kind: str, seconds: float) -> None:
    acc = _clock.get(None)
    if acc is not None:
        acc[kind] = acc.get(kind, 0.0) + seconds


class _TimedEngine:
    """Charges the time spent in ``generate`` to the calling episode."""

    def __init__(self, inner: InferenceEngine) -> None:
        self.inner = inner

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        t0 = time.perf_counter()
        try:
            return await self.inner.generate(requests)
        finally:
            _charge("gen", time.perf_counter() - t0)

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        await self.inner.load_weights(safetensors_bytes, version)


class _TimedSandbox:
    """Charges the time spent in sandbox calls to the calling episode."""

    def __init__(self, inner: SandboxClient) -> None:
        self.inner = inner

    async def create(
        self,
        environment: str = "base",
        *,
        labels: dict[str, str] | None = None,
        ttl_s: float = 900.0,
        **opts: Any,
    ) -> Created:
        t0 = time.perf_counter()
        try:
            return await self.inner.create(environment, labels=labels or {}, ttl_s=ttl_s, **opts)
        finally:
            _charge("sbx", time.perf_counter() - t0)

    async def exec(self, sandbox_id: str, command: str, **kw: Any) -> ExecResult:
        t0 = time.perf_counter()
        try:
            return await self.inner.exec(sandbox_id, command, **kw)
        finally:
            _charge("sbx", time.perf_counter() - t0)

    async def close(self, sandbox_id: str) -> None:
        await self.inner.close(sandbox_id)


@dataclass
class Row:
    concurrency: int
    batched: bool
    episodes: int
    wall_s: float
    chunks: int
    action_tokens: int
    mean_batch: float
    gen_s: float  # summed over episodes
    sbx_s: float
    rest_s: float

    @property
    def episodes_s(self) -> float:
        return self.episodes / self.wall_s

    @property
    def tokens_s(self) -> float:
        return self.action_tokens / self.wall_s

    @property
    def overhead_ms_per_chunk(self) -> float:
        return 1000 * self.rest_s / max(self.chunks, 1)

    @property
    def overhead_fraction(self) -> float:
        return self.rest_s / self.gen_s if self.gen_s else 0.0


async def bench_level(
    policy: Path, client: SandboxClient, concurrency: int, episodes: int, *, batched: bool, seed: int = 0
) -> Row:
    """``episodes`` episodes of the tiny policy, ``concurrency`` at once, on one engine."""
    engine = TorchEngine(policy, seed=seed)
    front: InferenceEngine = Batcher(engine, max_batch=concurrency) if batched else engine
    timed, sandbox = _TimedEngine(front), _TimedSandbox(client)
    settings = HarnessSettings(max_new_tokens_per_turn=48, max_total_tokens=600, command_timeout_s=5.0)
    tasks = builtin_tasks(seed=seed, count=episodes, levels=(1, 2, 3))
    limiter = anyio.Semaphore(concurrency)
    trajs: list[Trajectory] = []
    clocks: list[dict[str, float]] = []

    async def one(i: int) -> None:
        async with limiter:
            acc: dict[str, float] = {}
            _clock.set(acc)
            t0 = time.perf_counter()
            sample = TaskSample(run="bench", task=tasks[i], sample_idx=i)
            trajs.append(await run_episode(sample, engine=timed, sandbox=sandbox, settings=settings))
            acc["wall"] = time.perf_counter() - t0
            clocks.append(acc)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(episodes):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0
    async with anyio.create_task_group() as tg:
        for t in trajs:
            if t.sandbox_id:
                tg.start_soon(client.close, t.sandbox_id)
    gen = sum(c.get("gen", 0.0) for c in clocks)
    sbx = sum(c.get("sbx", 0.0) for c in clocks)
    return Row(
        concurrency=concurrency,
        batched=batched,
        episodes=episodes,
        wall_s=wall,
        chunks=sum(len(t.chunks) for t in trajs),
        action_tokens=sum(len(unpack_tokens(c.action_tokens)) for t in trajs for c in t.chunks),
        mean_batch=front.stats.mean_batch if isinstance(front, Batcher) else 1.0,
        gen_s=gen,
        sbx_s=sbx,
        rest_s=sum(c["wall"] for c in clocks) - gen - sbx,
    )


def render(rows: list[Row]) -> Table:
    t = Table(title="rollstream rollout: one worker, tiny policy (CPU, 1 thread), real sandboxes")
    cols = ("concurrency", "batching", "episodes", "episodes/s", "tokens/s", "mean batch", "gen s",
            "sandbox s", "harness ms/chunk", "harness / gen")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(
            str(r.concurrency), "on" if r.batched else "off", str(r.episodes), f"{r.episodes_s:.2f}",
            f"{r.tokens_s:,.0f}", f"{r.mean_batch:.2f}", f"{r.gen_s:.1f}", f"{r.sbx_s:.1f}",
            f"{r.overhead_ms_per_chunk:.2f}", f"{r.overhead_fraction:.1%}",
        )  # fmt: skip
    t.caption = (
        "tokens = action tokens generated; gen/sandbox s = time inside generate / sandbox calls summed "
        "over episodes;\nharness = episode wall time minus both, per chunk (at concurrency > 1 it also "
        "holds event-loop waits behind other episodes)"
    )
    return t


@contextlib.asynccontextmanager
async def sandbox_stack(tmp: Path, image: str = "base", **settings: Any) -> AsyncIterator[SandboxClient]:
    """A private nats-server and an in-process sandboxd (its own reaper scope ``bench-<port>``) for
    a benchmark; ``settings`` are ``SandboxdSettings`` fields, ``image`` is built first if missing."""
    await anyio.to_thread.run_sync(ensure_image, image)
    server = NatsServer(store_dir=tmp / "js", log_file=tmp / "nats.log").start()
    try:
        nc = await nats.connect(server.url)
        config = SandboxdSettings(**{"scope": f"bench-{server.port}", **settings})
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(daemon.run, config, nc)
                yield SandboxClient(nc, request_timeout_s=60.0)
                tg.cancel_scope.cancel()
        finally:
            await nc.close()
    finally:
        server.stop()


async def run_benchmark(
    concurrency: tuple[int, ...] = (1, 4, 8), episodes_per_slot: int = 2, compare_unbatched: bool = True
) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rs-bench-rollout-") as tmp:
        policy = await anyio.to_thread.run_sync(create_tiny_policy, Path(tmp) / "policy", corpus())
        async with sandbox_stack(Path(tmp), max_sandboxes=max(concurrency) * 2 + 2) as client:
            await bench_level(policy, client, 1, 1, batched=True)  # warm-up (image, torch kernels)
            for c in concurrency:
                episodes = max(4, c * episodes_per_slot)
                rows.append(await bench_level(policy, client, c, episodes, batched=True))
                if compare_unbatched and c > 1:
                    rows.append(await bench_level(policy, client, c, episodes, batched=False))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    parser.add_argument("--episodes-per-slot", type=int, default=2)
    parser.add_argument("--no-unbatched", action="store_true", help="skip the unbatched comparison")
    parser.add_argument("--gem-episodes", type=int, default=10, help="GEM episodes per player (0: skip)")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.concurrency.split(","))
    t0 = time.perf_counter()
    rows = asyncio.run(run_benchmark(levels, args.episodes_per_slot, not args.no_unbatched))
    console = Console(width=150)
    console.print(render(rows))
    if args.gem_episodes > 0:
        from ops.bench import gem_episodes

        gem = asyncio.run(gem_episodes.run_benchmark(args.gem_episodes))
        console.print(gem_episodes.render(gem_episodes.ENV_ID, gem))
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
