"""GEM episode benchmark: seconds per GuessTheNumber episode, played end to end in real sandboxes.

Two scripted players (no model cost) play ``game:GuessTheNumber-v0-hard`` (1..50 within 7 turns):
the binary-search expert (~4-5 guesses, always wins) and a random guesser (mostly all 7 turns).
Each episode goes through the real agent loop (``run_episode``: a sandbox from sandboxd's warm
pool, the task's setup ``reset``, which starts the episode's resident GEM process, one ``act`` per
turn), then the task's verifier runs as the reward group runs it. Episodes run one after the other,
so each figure is one episode's own latency. Goal (issue 17): <= 1 s per episode on 2 cores.

Run with ``python -m ops.bench.gem_episodes [--episodes 10] [--env-id ...]``; ``just bench-rollout``
runs it after the rollout table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from agent_harness.loop import run_episode
from agent_harness.policy_init import create_tiny_policy
from agent_harness.settings import HarnessSettings
from ops.bench.rollout import sandbox_stack
from producers.families.files import corpus
from producers.families.gem import GemToolRegistry, GuessTheNumberExpert
from producers.families.gem.tasks import gem_tasks
from sandboxd.client import SandboxClient
from schemas.task import TaskSample

ENV_ID = "game:GuessTheNumber-v0-hard"
SETTINGS = HarnessSettings(max_new_tokens_per_turn=64, max_total_tokens=3000, max_observation_tokens=96)


@dataclass
class Episode:
    play_s: float  # run_episode: sandbox, reset, every act
    verify_s: float
    steps: int
    won: bool

    @property
    def total_s(self) -> float:
        return self.play_s + self.verify_s


PLAYERS = {"binary search": 0.0, "random": 1.0}  # player -> the expert's error rate


async def play(
    client: SandboxClient, tokenizer_dir: Path, env_id: str, episodes: int, error_rate: float
) -> list[Episode]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tasks = await gem_tasks(client, env_id, seed=11, count=episodes + 1)
    out: list[Episode] = []
    for i, task in enumerate(tasks):
        engine = GuessTheNumberExpert(tokenizer=tokenizer, error_rate=error_rate, seed=i)
        t0 = time.perf_counter()
        traj = await run_episode(
            TaskSample(run="bench", task=task, sample_idx=i),
            engine=engine,
            sandbox=client,
            settings=SETTINGS,
            registry=GemToolRegistry(),
        )
        t1 = time.perf_counter()
        verdict = await client.exec(traj.sandbox_id, task.verify[0], timeout_s=30)
        t2 = time.perf_counter()
        await client.close(traj.sandbox_id)
        if i > 0:  # the first episode warms the pool, the tokenizer and the image's page cache
            out.append(Episode(t1 - t0, t2 - t1, len(traj.chunks), verdict.exit_code == 0))
        await anyio.sleep(0.5)  # let the pool refill, as between a worker's episodes
    return out


def render(env_id: str, results: dict[str, list[Episode]]) -> Table:
    t = Table(title=f"GEM episodes: {env_id}, scripted players, one at a time, real sandboxes")
    for col in ("player", "episodes", "won", "steps/episode", "play s (p50)", "verify s (p50)",
                "episode s (mean)", "episode s (p90)", "ms/step"):  # fmt: skip
        t.add_column(col, justify="right")
    for player, eps in results.items():
        _row(t, player, eps)
    t.caption = "episode = play (sandbox from the warm pool, reset, every act) + the verifier; goal ≤ 1 s"
    return t


def _row(t: Table, player: str, eps: list[Episode]) -> None:
    totals = sorted(e.total_s for e in eps)
    steps = sum(e.steps for e in eps)
    t.add_row(
        player,
        str(len(eps)),
        f"{sum(e.won for e in eps) / len(eps):.0%}",
        f"{steps / len(eps):.1f}",
        f"{statistics.median(e.play_s for e in eps):.2f}",
        f"{statistics.median(e.verify_s for e in eps):.2f}",
        f"{statistics.fmean(totals):.2f}",
        f"{totals[int(0.9 * (len(totals) - 1))]:.2f}",
        f"{1000 * sum(e.play_s for e in eps) / steps:.0f}",
    )


async def run_benchmark(episodes: int, env_id: str = ENV_ID) -> dict[str, list[Episode]]:
    with tempfile.TemporaryDirectory(prefix="rs-bench-gem-") as tmp:
        policy = await anyio.to_thread.run_sync(create_tiny_policy, Path(tmp) / "policy", corpus())
        async with sandbox_stack(
            Path(tmp), "gem", max_sandboxes=8, warm_pool=2, warm_environments=("gem",)
        ) as client:
            return {
                player: await play(client, policy, env_id, episodes, error_rate)
                for player, error_rate in PLAYERS.items()
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--env-id", default=ENV_ID)
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = asyncio.run(run_benchmark(args.episodes, args.env_id))
    console = Console(width=150)
    console.print(render(args.env_id, results))
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
