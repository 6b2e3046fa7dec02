"""Model benchmark (``just bench-models``): per architecture and dtype, generation tokens/s of the
torch engine (batched, KV cache) and learner samples/s.

Real parts: tiny offline checkpoints of each architecture (``agent_harness.architectures``, the
embedded policy's shape: 128 hidden, 3 layers) with their own tokenizers and chat templates; real
prompts rendered through each template; ``TorchEngine`` and ``Trainer`` as the workers use them
(one torch thread, as ``torch_threads = 1`` gives every worker).

The benchmark is a list of sections (``SECTIONS``): each takes the prepared ``Context`` and returns
one table. A new figure (weight publishing, server engines) is a new section appended there.

Run with ``python -m ops.bench.models [--archs qwen2,llama,mistral] [--dtypes float32,bfloat16]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch
from rich.console import Console
from rich.table import Table

from agent_harness.architectures import ARCHITECTURES, create_policy
from agent_harness.engine import GenRequest
from agent_harness.model import DType, PolicySettings
from agent_harness.policy_init import TINY_SHAPE
from agent_harness.prompt import Conversation
from agent_harness.tools import ToolRegistry
from agent_harness.torch_engine import TorchEngine
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from producers.families.files import builtin_tasks, corpus
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory


@dataclass
class Context:
    """What every section gets: the checkpoints per architecture and the options of the run."""

    policies: dict[str, Path]
    dtypes: tuple[DType, ...]
    batch: int = 8
    new_tokens: int = 64
    repeats: int = 3
    notes: list[str] = field(default_factory=list)


Section = Callable[[Context], Table]


def _prompts(policy: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    tasks = builtin_tasks(seed=7, count=n)
    return [Conversation(tok, ToolRegistry()).prompt(t.instruction) for t in tasks]


def _generate_s(engine: TorchEngine, prompts: list[list[int]], new_tokens: int) -> float:
    requests = [GenRequest(p, new_tokens, 1.0) for p in prompts]  # no stop: every row runs to the end
    t0 = time.perf_counter()
    gens = anyio.run(engine.generate, requests)
    elapsed = time.perf_counter() - t0
    assert all(len(g.tokens) == new_tokens for g in gens)
    return elapsed


def generation(ctx: Context) -> Table:
    """Tokens/s of one ``generate`` call of ``batch`` prompts (and of one prompt), KV-cached."""
    t = Table(title=f"generation: torch engine, {ctx.new_tokens} new tokens per row, 1 thread")
    for col in ("arch", "dtype", "prompt tokens", "batch 1 tok/s", f"batch {ctx.batch} tok/s", "batch gain"):
        t.add_column(col, justify="right")
    for arch, policy in ctx.policies.items():
        prompts = _prompts(policy, ctx.batch)
        for dtype in ctx.dtypes:
            engine = TorchEngine(policy, dtype=dtype, seed=0)
            _generate_s(engine, prompts[:2], 4)  # warm-up
            one = min(_generate_s(engine, prompts[:1], ctx.new_tokens) for _ in range(ctx.repeats))
            many = min(_generate_s(engine, prompts, ctx.new_tokens) for _ in range(ctx.repeats))
            single, batched = ctx.new_tokens / one, ctx.batch * ctx.new_tokens / many
            mean_prompt = sum(map(len, prompts)) // len(prompts)
            t.add_row(
                arch, dtype, str(mean_prompt), f"{single:,.0f}", f"{batched:,.0f}", f"{batched / single:.1f}x"
            )
    t.caption = (
        f"best of {ctx.repeats}; tokens/s counts generated tokens only (prompt prefill included in the time)"
    )
    return t


def _samples(prompt_len: int, n: int, vocab: int, seed: int) -> list[ScoredTrajectory]:
    """``n`` two-chunk trajectories of random tokens (a prompt, 32 action and 24 observation tokens
    per chunk), half of them successes."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(k)]

    def chunk(i: int) -> Chunk:
        return Chunk(
            index=i,
            action_tokens=pack_tokens(ids(32)),
            action_logprobs=pack_logprobs([-3.0] * 32),
            policy_version=0,
            tool_status="ok",
            obs_tokens=pack_tokens(ids(24)),
        )

    out = []
    for i in range(n):
        traj = Trajectory(
            traj_id=f"bench:{i}", run="bench", task_id=f"t{i % 4}", family="files", group_id=f"g{i % 4}",
            sample_idx=i, prompt_tokens=pack_tokens(ids(prompt_len)), chunks=[chunk(0), chunk(1)],
            status="completed", min_version=0, max_version=0,
        )  # fmt: skip
        out.append(ScoredTrajectory(traj=traj, reward=float(i % 2)))
    return out


def learner(ctx: Context) -> Table:
    """Samples/s of IPA optimiser steps on batches of ``batch`` trajectories."""
    t = Table(
        title=f"learner: IPA steps of {ctx.batch} samples (prompt 300 + 2 x (32 action + 24 obs) tokens)"
    )
    for col in ("arch", "dtype", "step s", "samples/s"):
        t.add_column(col, justify="right")
    settings = LearnerSettings(lr=1e-5, batch_size=ctx.batch)
    for arch, policy in ctx.policies.items():
        for dtype in ctx.dtypes:
            trainer = Trainer(policy, settings, PolicySettings(dtype=dtype))
            samples = _samples(300, ctx.batch, trainer.model.config.vocab_size, seed=1)
            trainer.train_step(samples)  # warm-up
            times = []
            for _ in range(ctx.repeats):
                t0 = time.perf_counter()
                trainer.train_step(samples)
                times.append(time.perf_counter() - t0)
            step = min(times)
            t.add_row(arch, dtype, f"{step:.2f}", f"{ctx.batch / step:.1f}")
    t.caption = f"best of {ctx.repeats} steps after one warm-up; forward + backward + AdamW, 1 thread"
    return t


SECTIONS: dict[str, Section] = {"generation": generation, "learner": learner}
"""The benchmark's tables, in order; add a section here to add figures."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=150)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rs-bench-models-") as tmp:
        text = list(corpus(seed=0, episodes=200))
        policies = {a: create_policy(Path(tmp) / a, a, text, shape=TINY_SHAPE) for a in args.archs.split(",")}
        ctx = Context(policies, tuple(args.dtypes.split(",")), args.batch, args.new_tokens)
        for name in args.sections.split(","):
            console.print(SECTIONS[name](ctx))
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
