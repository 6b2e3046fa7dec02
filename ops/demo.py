"""The learning demonstration: expert seeding, SFT warm start, then online IPA vs token-level GRPO.

One command reproduces it (real nats-server, real Docker sandboxes, real torch, one process)::

    python -m ops.demo --minutes 15 --out demo-out

One driver serves every task family (``DemoPlan.family``); ``ops.demo_gem`` is its plan for a GEM
game. Phases, here on the built-in ``files`` family (levels 1-2) in real sandboxes:

0. **Floor** (when ``random_episodes`` > 0): the family's expert at error rate 1.0 plays the
   held-out tasks.
1. **Seed**: ``producers.seed`` runs the family's scripted expert (it errs with probability
   ``error_rate``) and publishes its scored trajectories (run ``seed``, ``replay_mode="sft"``); the
   lake keeps them. The expert's success rate is measured on these episodes.
2. **Warm start**: ``learner.warmstart.imitate`` on the successful expert trajectories loaded back
   from the lake (``consumers.lake.load_scored``), installed as version 1.
3. **Online RL** from the same warm start, one run per arm of ``runs`` (``ARMS``: ``ipa``, the IPA
   loss; ``grpo``, token-level GRPO; ``ipa_nois``, the ablation of IPA without the chunk importance
   ratio on failures), under a share of the time budget each, or until its learner trained
   ``online_samples`` online samples (equal sample counts); with ``online_seeds``, every arm once
   per seed (run ``<arm>-s<seed>``: the producer's task order, the sampling and the learner's seed),
   all from the same warm start, and the table pools each arm's seeds. Each runs the real
   workers in-process (``ops.pipeline``: producer, rollout, reward, learner, lake writer) on the
   shared broker and lake.
4. **Evaluation**: the same held-out tasks, the same temperature, for the warm-started policy and
   for each run's final policy.

Success means full marks (``reward >= 1``: the files family scores 0 or 1; a GEM game is won). It
prints the success rates with wall times, and writes ``demo.txt``, ``demo.json`` (per arm: successes,
episodes, 95 % interval), ``demo.png`` (the table as bars) and the ``rollstream report`` plots
for the lake (success by policy version per run) into ``--out``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_harness.policy_init import create_tiny_policy
from consumers.lake import query
from learner.checkpoint import checkpoint_path, latest_checkpoint, read_state
from learner.settings import LearnerSettings
from learner.warmstart import WARM_VERSION, imitate
from ops import pipeline
from ops.config import Config, load_config
from ops.demo_result import Curve, DemoResult, Rate
from producers import families, seed
from producers.families.files import corpus
from producers.play import EngineFor, play
from sandboxd.client import SandboxClient
from schemas.task import TaskSample
from schemas.trajectory import ScoredTrajectory
from streams.server import NatsServer
from streams.topology import ensure

log = structlog.get_logger(__name__)
EVAL_SEED = 424_242
SEED_RUN = "seed"
ONLINE_WORKERS = ("lake", "learner", "reward", "rollout", "producer")
SUCCESS_SQL = (
    "SELECT traj_id FROM trajectories WHERE source = 'expert' AND valid AND reward >= 1 "
    f"AND run = '{SEED_RUN}' ORDER BY traj_id"
)
T = TypeVar("T")
# Online arms: run name -> (learner.loss, other learner settings of the arm)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "ipa": ("ipa", {}),
    "grpo": ("grpo", {}),
    "ipa_nois": ("ipa", {"ipa_failure_is": False}),
}


@dataclass(frozen=True)
class DemoPlan:
    """Every knob of the demonstration; the defaults are the settings whose figures are reported."""

    family: str = "files"  # a registered task family (``producers.families``)
    env_id: str = ""  # GEM env id (``family = "gem"``)
    minutes: float = 45.0  # budget of the whole demo; the online phases get what is left
    levels: tuple[int, ...] = (1, 2)
    expert_levels: tuple[int, ...] = ()  # what seeding demonstrates; empty: ``levels``
    # Imitation is not enough (docs/learning.md): the expert copies a level-2 note unread, which fails
    # on a note with a second line; SFT on its successes keeps that shortcut, reward removes it.
    note_extra: float = 0.6  # producer.note_extra
    expert_shortcut: float = 0.6  # producer.expert_shortcut
    # ~350 successful demonstrations: with 116 (160 episodes) SFT reached only ~60 %, because the
    # tiny model then memorises which word goes with which task instead of learning to copy
    seed_episodes: int = 480
    error_rate: float = 0.3
    # the rate decaying to a tenth: 600 steps at a constant rate once stopped in a plateau (loss
    # ~0.14, sampled copy accuracy 33 %); this schedule crossed it (loss 0.002; README, Learning)
    sft_steps: int = 1000
    sft_batch: int = 16
    sft_lr: float = 3e-3
    sft_final_lr: float = 0.1  # fraction of sft_lr at the last step (1.0: constant)
    eval_episodes: int = 256  # 95 % interval about ±4 points at 90 %
    random_episodes: int = 0  # held-out tasks played by the expert at error rate 1.0 (the floor)
    temperature: float = 1.0
    group_size: int = 4
    concurrency: int = 8
    runs: tuple[str, ...] = ("ipa", "grpo", "ipa_nois")  # online arms, each a key of ``ARMS``
    # one online run per arm and seed, all from the same warm start (empty: ``seed`` alone)
    online_seeds: tuple[int, ...] = ()
    online_seconds: float = 0.0  # per run; 0: share what the budget leaves
    online_samples: int = 0  # per run: stop once the learner trained this many online samples (0: time)
    min_online_s: float = 60.0  # each online run gets at least this long, whatever the budget left
    reward: str = "graded"  # producer.reward: "won" scores every task 1 iff won
    harness: dict[str, Any] = field(default_factory=dict)  # rollout.harness overrides
    rl: dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 2e-4,
            "batch_size": 16,  # four whole groups of four
            "batch_timeout_s": 5.0,
            "max_staleness": 2,
            # Group-normalised advantages for both losses: a sample is judged against other
            # attempts at the same task. Without them (0/1 rewards, successes only) the policy
            # collapses: it learns which words succeed most often, not to copy the right one
            # (offline check: copy accuracy 44 % -> 1 % in 40 steps at lr 1e-3; with the
            # baseline 44 % -> 48 % at lr 3e-4).
            "group_baseline": True,
            # groups that all succeed (most, after the warm start) or all fail carry no signal
            # under the group baseline: train on the informative ones (issue 17)
            "dynamic_sampling": True,
            "checkpoint_every": 1,
        }
    )
    seed: int = 0

    def online(self) -> list[tuple[str, str, int]]:
        """(run, arm, seed) of every online run, seed by seed; a run is named after its arm alone
        when there is one seed, else ``<arm>-s<seed>``."""
        seeds = self.online_seeds or (self.seed,)
        if len(seeds) == 1:
            return [(arm, arm, seeds[0]) for arm in self.runs]
        return [(f"{arm}-s{sd}", arm, sd) for sd in seeds for arm in self.runs]

    @property
    def title(self) -> str:
        tasks = self.env_id or f"{self.family} levels {'-'.join(map(str, self.levels))}"
        if self.expert_levels and self.expert_levels != self.levels:
            tasks += f" (expert shows {'-'.join(map(str, self.expert_levels))})"
        if self.note_extra or self.expert_shortcut:
            tasks += f", {self.note_extra:.0%} long notes, expert copies {self.expert_shortcut:.0%}"
        return f"Learning demo: {tasks}"


# --- configuration and the shared stack ---------------------------------------------------------


def demo_config(state: Path, port: int, run: str, plan: DemoPlan) -> Config:
    """The configuration of one run of the demo (shared state dir, broker and lake); an online
    run takes its arm's loss and settings (``ARMS``) and its seed."""
    arm_name, run_seed = next(((a, sd) for r, a, sd in plan.online() if r == run), (run, plan.seed))
    loss, arm = ARMS.get(arm_name, ("ipa", {}))
    sets = [
        f'state_dir="{state}"',
        f"run={run}",
        f"nats.port={port}",
        f'sandboxd.scope="demo-{port}"',
        "sandboxd.max_sandboxes=48",
        f'producer.source="{families.get(plan.family).source}"',
        f'producer.env_id="{plan.env_id}"',
        f'producer.reward="{plan.reward}"',
        f"producer.levels={list(plan.levels)}",
        f"producer.expert_levels={list(plan.expert_levels)}",
        f"producer.note_extra={plan.note_extra}",
        f"producer.expert_shortcut={plan.expert_shortcut}",
        f"producer.group_size={plan.group_size}",
        f"producer.seed={run_seed}",
        f"producer.max_inflight={plan.concurrency * 2}",
        f"rollout.concurrency={plan.concurrency}",
        f"rollout.harness.temperature={plan.temperature}",
        f"reward.concurrency={plan.concurrency}",
        f'learner.loss="{loss}"',
        f"learner.seed={run_seed}",
        "lake.flush_interval_s=2.0",
    ]
    sets += [f"rollout.harness.{k}={_toml(v)}" for k, v in plan.harness.items()]
    sets += [f"learner.{k}={_toml(v)}" for k, v in {**plan.rl, **arm}.items()]
    return load_config(None, sets)


def _toml(value: Any) -> str:
    return msgspec.toml.encode({"v": value}).decode().split("=", 1)[1].strip()


@dataclass
class Stack:
    state: Path
    port: int
    nc: NATS
    js: JetStreamContext
    plan: DemoPlan

    def config(self, run: str) -> Config:
        return demo_config(self.state, self.port, run, self.plan)


@asynccontextmanager
async def stack(state: Path, plan: DemoPlan) -> AsyncIterator[Stack]:
    """A nats-server, the topology of the seed and online runs and a sandboxd, for the block."""
    server = NatsServer(store_dir=state / "nats", log_file=state / "nats.log").start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=2)
        js = nc.jetstream(timeout=10)
        s = Stack(state, server.port, nc, js, plan)
        for run in (SEED_RUN, *(r for r, _, _ in plan.online())):
            await ensure(js, run)
        async with anyio.create_task_group() as tg:
            await pipeline.start(tg, ["sandboxd"], s.config(SEED_RUN), js, nc)
            yield s
            tg.cancel_scope.cancel()
        await nc.close()
    finally:
        server.stop()


async def wait_for_rows(lake: Path, sql: str, n: int, timeout_s: float = 120.0) -> None:
    """Wait until ``sql`` (a count) reaches ``n`` in the lake."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                got = query(lake, sql).to_pylist()[0]
                if int(next(iter(got.values())) or 0) >= n:
                    return
            except Exception:  # noqa: BLE001 - the lake may not have the table yet
                pass
            await anyio.sleep(1.0)


def rate(results: Sequence[ScoredTrajectory]) -> Rate:
    """Full-marks successes out of the valid episodes."""
    valid = [r for r in results if r.valid]
    return Rate(sum(r.reward >= 1.0 for r in valid), len(valid))


# --- phases -------------------------------------------------------------------------------------


async def held_out(s: Stack, count: int) -> list[TaskSample]:
    """Held-out tasks of the plan's family (their own seed), the same for every policy evaluated."""
    cfg = s.config("eval")
    family = families.get(s.plan.family)
    sandbox = SandboxClient(s.nc)
    tasks = await family.make_tasks(sandbox, cfg.producer, seed=EVAL_SEED + s.plan.seed, start=0, count=count)
    return [
        TaskSample(run="eval", task=msgspec.structs.replace(t, task_id=f"eval-{t.task_id}"), sample_idx=0)
        for t in tasks
    ]


async def episodes(s: Stack, samples: Sequence[TaskSample], engine_for: EngineFor) -> Rate:
    """Play and score ``samples`` in real sandboxes, outside the streams; their success rate."""
    cfg = s.config("eval")
    results = await play(
        samples,
        engine_for,
        SandboxClient(s.nc),
        cfg.rollout.harness,
        tools_for=families.tools_for,
        verify_timeout_s=cfg.reward.verify_timeout_s,
        concurrency=s.plan.concurrency,
    )
    return rate(results)


async def floor_phase(s: Stack, samples: Sequence[TaskSample], tokenizer: Any) -> Rate:
    """The family's expert erring at every step (error rate 1.0): what chance alone achieves."""
    family = families.get(s.plan.family)
    return await episodes(s, samples, seed.experts(family, tokenizer, error_rate=1.0, version=0))


async def seed_phase(s: Stack) -> Rate:
    """Publish expert trajectories (run ``seed``), wait until the lake holds them; their success rate."""
    cfg = s.config(SEED_RUN)
    async with anyio.create_task_group() as tg:
        await pipeline.start(tg, ["lake"], cfg, s.js, s.nc)
        report = await seed.run(
            pipeline.seeding(cfg),
            s.js,
            s.nc,
            run=cfg.run,
            policy_dir=cfg.policy_dir,
            episodes=s.plan.seed_episodes,
            error_rate=s.plan.error_rate,
        )
        sql = f"SELECT count(*) AS n FROM trajectories WHERE run = '{SEED_RUN}'"
        await wait_for_rows(cfg.lake_root, sql, report.episodes)
        tg.cancel_scope.cancel()
    sql = (
        "SELECT count(*) AS n, coalesce(sum(CASE WHEN reward >= 1 THEN 1 ELSE 0 END), 0) AS wins "
        f"FROM trajectories WHERE run = '{SEED_RUN}' AND valid"
    )
    [row] = query(cfg.lake_root, sql).to_pylist()
    return Rate(int(row["wins"]), int(row["n"]))


def sft_warm_start(
    lake_root: Path, base: Path, out_root: Path, plan: DemoPlan
) -> tuple[Path, list[float], int]:
    """Imitate the lake's successful expert trajectories (``learner.warmstart.imitate``): the
    checkpoint written under ``out_root`` (version 1, fresh optimiser at the online learning rate),
    the losses and the number of demonstrations."""
    from consumers.lake import load_scored

    samples = load_scored(lake_root, SUCCESS_SQL)
    path, losses = imitate(
        base,
        samples,
        out_root,
        LearnerSettings(lr=float(plan.rl["lr"]), seed=plan.seed),
        steps=plan.sft_steps,
        batch=plan.sft_batch,
        lr=plan.sft_lr,
        final_lr_fraction=plan.sft_final_lr,
    )
    return path, losses, len(samples)


async def evaluate(s: Stack, policy_dir: Path, samples: Sequence[TaskSample]) -> Rate:
    """Success rate of the policy at ``policy_dir`` on ``samples``, in real sandboxes."""
    from agent_harness.batcher import Batcher
    from agent_harness.torch_engine import TorchEngine

    engine = await anyio.to_thread.run_sync(lambda: TorchEngine(policy_dir, seed=s.plan.seed))
    batcher = Batcher(engine, max_batch=s.plan.concurrency)
    return await episodes(s, samples, lambda _: batcher)


async def online_phase(s: Stack, run: str, warm: Path, seconds: float) -> tuple[Path, int]:
    """The real workers (``ops.pipeline``) from the warm start, with the settings of the run's arm
    and seed, for ``seconds`` or until the learner trained ``online_samples`` online samples; the
    final policy's checkpoint and the online samples trained."""
    from agent_harness.torch_engine import TorchEngine

    cfg = s.config(run)
    ckpt_root = cfg.checkpoint_root
    if latest_checkpoint(ckpt_root) is None:  # the learner resumes from the warm start (version 1)
        shutil.copytree(warm, checkpoint_path(ckpt_root, 0))
    engine = await anyio.to_thread.run_sync(
        lambda: TorchEngine(warm, seed=cfg.learner.seed, version=WARM_VERSION)
    )
    before = trained_online(run)
    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            await pipeline.start(tg, ONLINE_WORKERS, cfg, s.js, s.nc, engine=engine)
            while s.plan.online_samples:  # equal sample counts: every run stops at the same count
                if trained_online(run) - before >= s.plan.online_samples:
                    tg.cancel_scope.cancel()
                    break
                await anyio.sleep(0.5)
    final = latest_checkpoint(ckpt_root)
    assert final is not None
    return final, trained_online(run) - before


def trained_online(run: str) -> int:
    """Online samples this process's learners trained for ``run`` (``rollstream_train_samples``)."""
    from prometheus_client import REGISTRY

    labels = {"run": run, "fate": "trained", "source": "online"}
    return int(REGISTRY.get_sample_value("rollstream_train_samples_total", labels) or 0)


def online_curve(lake_root: Path, run: str, buckets: int = 4) -> Curve:
    """The run's rollouts in ``buckets`` consecutive version ranges: (first version, n, success)."""
    sql = (
        "SELECT policy_version AS v, count(*) AS n, sum(CASE WHEN reward >= 1 THEN 1 ELSE 0 END) AS w "
        f"FROM trajectories WHERE run = '{run}' AND valid GROUP BY 1 ORDER BY 1"
    )
    try:
        rows = query(lake_root, sql).to_pylist()
    except Exception:  # noqa: BLE001 - no rollout reached the lake
        return []
    size = max(1, -(-len(rows) // buckets))
    out = []
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        n = sum(int(r["n"]) for r in part)
        out.append((int(part[0]["v"]), n, sum(int(r["w"]) for r in part) / max(1, n)))
    return out


async def _timed(result: DemoResult, phase: str, job: Awaitable[T]) -> T:
    t = time.monotonic()
    value = await job
    result.wall[phase] = time.monotonic() - t
    return value


async def warm_phase(s: Stack, base: Path, tasks: Sequence[TaskSample], result: DemoResult) -> Path:
    """SFT warm start from the seeded lake, then its evaluation; the warm checkpoint."""
    t = time.monotonic()
    warm, result.sft_loss, result.demonstrations = await anyio.to_thread.run_sync(
        lambda: sft_warm_start(s.config(SEED_RUN).lake_root, base, s.state / "warm", s.plan)
    )
    result.wall["sft"] = time.monotonic() - t
    result.warm = await evaluate(s, warm, tasks)
    result.wall["warm"] = time.monotonic() - t
    log.info("demo_warm", success=str(result.warm), demonstrations=result.demonstrations)
    return warm


async def online_runs(
    s: Stack, warm: Path, tasks: Sequence[TaskSample], result: DemoResult, deadline: float
) -> None:
    """Each run of the plan from the warm start, sharing what is left until ``deadline`` (a
    ``time.monotonic()``), each share including its evaluation; then that evaluation."""
    eval_s = result.wall["warm"] - result.wall["sft"]
    online = s.plan.online()
    for i, (run, arm, run_seed) in enumerate(online):
        share = (deadline - time.monotonic()) / (len(online) - i) - eval_s
        t = time.monotonic()
        seconds = s.plan.online_seconds or max(s.plan.min_online_s, share)
        final, result.trained[run] = await online_phase(s, run, warm, seconds)
        result.arms[run] = (arm, run_seed)
        result.versions[run] = read_state(final).version
        result.after[run] = await evaluate(s, final, tasks)
        result.wall[run] = time.monotonic() - t
        result.online[run] = online_curve(s.config(run).lake_root, run)
        log.info(
            "demo_online",
            run=run,
            success=str(result.after[run]),
            version=result.versions[run],
            trained=result.trained[run],
        )


async def run_demo(out: Path, plan: DemoPlan = DemoPlan()) -> DemoResult:
    """Run every phase in ``out/state`` and write the report into ``out``; returns the figures."""
    from transformers import AutoTokenizer

    from ops.report import write_report
    from ops.worker import set_torch_threads

    # One thread: learner, rollout and the sandboxes' processes share the same few cores, and two
    # contending torch threads made an SFT step ~5x slower here.
    set_torch_threads(1)
    t_start = time.monotonic()
    state = (out / "state").resolve()
    state.mkdir(parents=True, exist_ok=True)
    base = create_tiny_policy(state / "policy" / "base", corpus(seed=plan.seed), seed=plan.seed)
    result = DemoResult(title=plan.title)
    async with stack(state, plan) as s:
        tasks = await held_out(s, max(plan.eval_episodes, plan.random_episodes))
        if plan.random_episodes:
            floor = floor_phase(s, tasks[: plan.random_episodes], AutoTokenizer.from_pretrained(base))
            result.random = await _timed(result, "random", floor)
        tasks = tasks[: plan.eval_episodes]
        result.expert = await _timed(result, "seed", seed_phase(s))
        log.info("demo_seeded", expert=str(result.expert), seconds=round(result.wall["seed"]))
        warm = await warm_phase(s, base, tasks, result)
        await online_runs(s, warm, tasks, result, t_start + plan.minutes * 60)
    result.wall["total"] = time.monotonic() - t_start
    await anyio.to_thread.run_sync(lambda: write_report(state / "lake", out))
    (out / "demo.txt").write_text(result.table() + "\n", encoding="utf-8")
    (out / "demo.json").write_bytes(result.to_json())
    result.plot(out / "demo.png")
    return result


if __name__ == "__main__":
    from ops.demo_cli import main

    main()
