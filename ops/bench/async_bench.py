"""Asynchrony benchmark: what the staleness bound η buys when episode durations are long-tailed.

The learner is the real one (``learner.worker.run``: staleness gate, IPA step on the tiny Qwen2
policy, checkpoint, weights to the object store, version to KV, train log) on a real nats-server.
The rollout side is **synthetic in its durations only**: each actor waits for admission, stamps its
episode with the latest announced policy version, sleeps a lognormal time (the long tail of agent
episodes) and publishes a real ``ScoredTrajectory`` whose chunks are tokens the tiny policy sampled
on the built-in task prompt, with their behaviour log-probabilities (generated once, re-stamped).

Admission is the rule the task producer applies: an actor may start an episode at latest version
``L`` while ``started < batch · (L + 1 + η)``. At η = 0 that is one batch per version, so the
learner waits for the slowest episode of every batch (synchronous RL); at η ≥ 1 actors run ahead
by η versions and the learner trains whatever arrives within the bound.

Prints, per η: trained samples/s, learner idle fraction (time spent waiting for a batch), the
staleness histogram of trained samples and the dropped fraction. Goal (issue 6): ≥ 3× samples/s at
η ≥ 2 over η = 0, learner idle under 10 %. Run with ``python -m ops.bench.async_bench``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

from agent_harness.engine import GenRequest
from agent_harness.policy_init import create_tiny_policy
from agent_harness.prompt import encode, observation_tokens, prompt_tokens
from agent_harness.tools import ToolRegistry
from learner import worker
from ops.config import load_config
from producers.families.files import WORDS, corpus
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.codec import train_decoder
from schemas.train import TrainRecord
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams import policy
from streams.bus import Publisher
from streams.server import NatsServer
from streams.topology import TRAIN, ensure, subject


@dataclass(frozen=True)
class BenchPlan:
    etas: tuple[int, ...] = (0, 1, 2, 4)
    seconds: float = 45.0  # measured window per η (after warm-up)
    warmup_s: float = 8.0
    batch: int = 8
    actors: int = 64
    median_s: float = 0.25  # lognormal episode duration: median and σ of its log
    sigma: float = 1.2
    turns: int = 2
    seed: int = 0


@dataclass
class EtaResult:
    eta: int
    seconds: float = 0.0
    trained: int = 0
    dropped: int = 0
    idle: float = 0.0
    staleness: Counter[int] = field(default_factory=Counter)
    steps: int = 0

    @property
    def rate(self) -> float:
        return self.trained / self.seconds if self.seconds else 0.0

    @property
    def dropped_fraction(self) -> float:
        seen = self.trained + self.dropped
        return self.dropped / seen if seen else 0.0


# --- real trajectories of the tiny policy ----------------------------------------------------------


async def policy_templates(policy_dir: Path, n: int, turns: int, seed: int) -> list[Trajectory]:
    """``n`` trajectories whose actions the tiny policy sampled (no sandbox: a fixed observation)."""
    from agent_harness.torch_engine import TorchEngine

    engine = await anyio.to_thread.run_sync(lambda: TorchEngine(policy_dir, seed=seed))
    tok = engine.tokenizer
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq = prompt_tokens(tok, f"Write the word {rng.choice(WORDS)} to answer.txt.", ToolRegistry())
        prompt_len, chunks = len(seq), []
        for k in range(turns):
            [gen] = await engine.generate([GenRequest(list(seq), 48, 1.0)])
            obs = observation_tokens(tok, encode(tok, rng.choice(WORDS)), action_closed=False)
            obs = obs if k < turns - 1 else []
            chunks.append(
                Chunk(
                    index=k,
                    action_tokens=pack_tokens(gen.tokens),
                    action_logprobs=pack_logprobs(gen.logprobs),
                    policy_version=0,
                    tool_name="bash",
                    tool_args='{"command": "ls"}',
                    tool_status="ok",
                    obs_tokens=pack_tokens(obs),
                )
            )
            seq += gen.tokens + obs
        out.append(
            Trajectory(
                traj_id=f"template-{i}",
                run="bench",
                task_id=f"template-{i}",
                family="files",
                group_id=f"template-{i}",
                sample_idx=0,
                prompt_tokens=pack_tokens(seq[:prompt_len]),
                chunks=chunks,
                status="completed",
                min_version=0,
                max_version=0,
            )
        )
    return out


def stamped(template: Trajectory, run: str, version: int, reward: float) -> ScoredTrajectory:
    """A fresh sample from a template: new ids, every chunk stamped with ``version``."""
    tid = uuid.uuid4().hex[:12]
    chunks = [msgspec.structs.replace(c, policy_version=version) for c in template.chunks]
    traj = msgspec.structs.replace(
        template,
        traj_id=f"{run}:{tid}:0",
        run=run,
        task_id=tid,
        group_id=f"{run}:{tid}",
        chunks=chunks,
        min_version=version,
        max_version=version,
    )
    return ScoredTrajectory(traj=traj, reward=reward, scored_at=time.time())


# --- one η ---------------------------------------------------------------------------------------


class Versions:
    """The latest announced version, polled from KV (what rollout workers see)."""

    def __init__(self) -> None:
        self.latest = 0
        self.changed = anyio.Event()

    async def watch(self, js: JetStreamContext, run: str) -> None:
        while True:
            rec = await policy.latest(js, run)
            if rec is not None and rec.version > self.latest:
                self.latest = rec.version
                self.changed.set()
                self.changed = anyio.Event()
            await anyio.sleep(0.02)


async def actors(
    js: JetStreamContext, run: str, eta: int, plan: BenchPlan, templates: list[Trajectory], v: Versions
) -> None:
    """Synthetic rollout workers (see the module docstring): admission, lognormal sleep, publish."""
    pub = Publisher(js)
    rng = random.Random(plan.seed + eta)
    started = 0

    async def actor() -> None:
        nonlocal started
        while True:
            while started >= plan.batch * (v.latest + 1 + eta):
                await v.changed.wait()
            started += 1
            version = v.latest
            await anyio.sleep(rng.lognormvariate(0.0, plan.sigma) * plan.median_s)
            sample = stamped(rng.choice(templates), run, version, float(rng.random() < 0.5))
            await pub.publish(subject("scored", run), sample, msg_id=f"scored:{sample.traj.traj_id}")

    async with anyio.create_task_group() as tg:
        for _ in range(plan.actors):
            tg.start_soon(actor)


async def measure_eta(
    js: JetStreamContext, state: Path, url: str, eta: int, plan: BenchPlan, templates: list[Trajectory]
) -> EtaResult:
    run = f"async-eta{eta}"
    cfg = load_config(
        None,
        [
            f'state_dir="{state}"',
            f"run={run}",
            f'nats.url="{url}"',
            f"learner.max_staleness={eta}",
            f"learner.batch_size={plan.batch}",
            "learner.batch_timeout_s=60",
            "learner.failure_reward=-0.5",
            "learner.lr=1e-4",
        ],
    )
    await ensure(js, run)
    result = EtaResult(eta=eta)
    stats = worker.LearnerStats()
    versions = Versions()
    window: dict[str, float] = {}

    async def count_train_log() -> None:
        sub = await js.subscribe(subject("train", run), stream=TRAIN.name, ordered_consumer=True)
        async for msg in sub.messages:
            rec = train_decoder.decode(msg.data)
            if not isinstance(rec, TrainRecord) or "start" not in window:
                continue
            if rec.fate == "trained":
                result.trained += 1
                result.staleness[rec.staleness] += 1
            else:
                result.dropped += 1

    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: worker.run(
                cfg.learner,
                js,
                run=run,
                policy_dir=cfg.policy_dir,
                checkpoint_root=cfg.checkpoint_root,
                group_size=cfg.producer.group_size,
                stats=stats,
                task_status=task_status,
            )
        )
        tg.start_soon(versions.watch, js, run)
        tg.start_soon(count_train_log)
        tg.start_soon(actors, js, run, eta, plan, templates, versions)
        await anyio.sleep(plan.warmup_s)
        window["start"] = time.monotonic()
        wait0, busy0, v0 = stats.wait_s, stats.busy_s, versions.latest
        await anyio.sleep(plan.seconds)
        result.seconds = time.monotonic() - window["start"]
        wait, busy = stats.wait_s - wait0, stats.busy_s - busy0
        result.idle = wait / (wait + busy) if wait + busy else 0.0
        result.steps = versions.latest - v0
        tg.cancel_scope.cancel()
    return result


# --- output --------------------------------------------------------------------------------------


def render(results: list[EtaResult]) -> Table:
    base = results[0].rate if results and results[0].eta == 0 else 0.0
    table = Table(title="learner throughput by staleness bound η (episode durations synthetic)")
    for col in ("η", "samples/s", "× η=0", "learner idle", "versions", "dropped", "staleness of trained"):
        table.add_column(col, justify="right")
    for r in results:
        hist = " ".join(f"{s}:{n}" for s, n in sorted(r.staleness.items()))
        table.add_row(
            str(r.eta),
            f"{r.rate:.1f}",
            f"{r.rate / base:.1f}×" if base else "-",
            f"{r.idle:.0%}",
            str(r.steps),
            f"{r.dropped_fraction:.1%}",
            hist,
        )
    return table


async def run_bench(plan: BenchPlan) -> list[EtaResult]:
    with tempfile.TemporaryDirectory(prefix="rs-async-") as tmp:
        state = Path(tmp)
        policy_dir = await anyio.to_thread.run_sync(
            lambda: create_tiny_policy(state / "policy" / "base", corpus())
        )
        templates = await policy_templates(policy_dir, 16, plan.turns, plan.seed)
        server = NatsServer(store_dir=state / "nats").start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream(timeout=10)
            results = [await measure_eta(js, state, server.url, eta, plan, templates) for eta in plan.etas]
            await nc.close()
        finally:
            server.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    from ops.logs import configure_logging

    parser = argparse.ArgumentParser(description="samples/s, learner idle and staleness at several η")
    parser.add_argument("--seconds", type=float, default=BenchPlan.seconds, help="measured window per η")
    parser.add_argument("--batch", type=int, default=BenchPlan.batch)
    parser.add_argument("--median", type=float, default=BenchPlan.median_s, help="median episode seconds")
    parser.add_argument("--sigma", type=float, default=BenchPlan.sigma, help="σ of log episode seconds")
    parser.add_argument("--etas", type=str, default="0,1,2,4")
    args = parser.parse_args(argv)
    configure_logging("warning")
    plan = BenchPlan(
        etas=tuple(int(e) for e in args.etas.split(",")),
        seconds=args.seconds,
        batch=args.batch,
        median_s=args.median,
        sigma=args.sigma,
    )
    console = Console()
    t0 = time.perf_counter()
    results = anyio.run(run_bench, plan)
    console.print(render(results))
    console.print(
        f"episodes: lognormal, median {plan.median_s:.2f}s, σ {plan.sigma} (synthetic durations; real "
        f"tiny-policy tokens); batch {plan.batch}; goal ≥ 3× at η ≥ 2, idle < 10 %; "
        f"done in {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
