"""The learning demonstration on a GEM game: ``game:GuessTheNumber-v0-easy`` (1..10, 4 turns).

One command (real nats-server, real Docker sandboxes of the ``gem`` image, real torch)::

    python -m ops.demo_gem --minutes 20 --out demo-gem

It reuses ``ops.demo`` (broker and sandboxd stack, configuration, plan) with GEM tasks:

1. **Floor**: a player that guesses uniformly at random plays the held-out tasks (~34 % wins).
2. **Seed**: a binary-search expert that, at every turn, guesses at random instead with
   probability ``error_rate`` (so ~77 % wins at 0.3) plays expert tasks; its scored trajectories
   land in the lake (run ``seed``, ``source = 'expert'``, ``replay_mode = 'sft'``).
3. **Warm start**: the tiny policy imitates the expert's *won* episodes (SFT).
4. **Online RL** from the warm start with the real workers (producer with ``source = gem``,
   rollout, reward, learner, lake): IPA, then GRPO when ``runs`` holds it.
5. **Evaluation** of the warm and final policies on the same held-out tasks, same temperature.

Success means *won*. GEM's graded reward gives a lost game partial credit (``1 - distance / 9`` at
the last turn), so ``reward > 0``, which the ``files`` demo counts, would count close losses, and
trained on, it taught the policy to lose close: with IPA, no baseline, lr 1e-3, the rollouts' win
rate fell 39 % -> 21 % -> 15 % while their mean graded reward held ~0.65, then the policy collapsed
into one malformed call (reward 0: no gradient any more). So by default (``reward = "won"``) every
task here is scored 1 iff won (``won_only``). GuessTheNumber-easy has only ten targets, so
"held-out" means other seeds of the same ten games.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from agent_harness.batcher import Batcher
from agent_harness.engine import Generation, GenRequest, InferenceEngine
from agent_harness.gem_episode import GuessTheNumberExpert, act_call, next_guess, registry_for
from agent_harness.loop import run_episode
from agent_harness.policy_init import create_tiny_policy
from agent_harness.prompt import encode
from consumers.lake import query
from consumers.reward import score
from learner.checkpoint import checkpoint_path, latest_checkpoint
from learner.settings import LearnerSettings
from learner.warmstart import WARM_VERSION, imitate
from ops.config import Config
from ops.demo import EVAL_SEED, SEED_RUN, DemoPlan, Stack, demo_config, final_version, stack, wait_for_rows
from producers.gem_tasks import gem_tasks
from sandboxd.client import SandboxClient
from schemas.task import Task, TaskSample
from schemas.trajectory import ScoredTrajectory
from streams.bus import Publisher, backlog
from streams.topology import ROLLOUT, subject

log = structlog.get_logger(__name__)
GUESS_EASY = "game:GuessTheNumber-v0-easy"
EXPERT_SEED_OFFSET = 1_000_003
WON_SQL = (
    "SELECT traj_id FROM trajectories WHERE source = 'expert' AND valid AND reward >= 1 "
    f"AND run = '{SEED_RUN}' ORDER BY traj_id"
)
_RANGE = re.compile(r"between (\d+) and (\d+)")
OBSERVE_BATCH = 16  # first observations per sandbox exec (~750 bytes each)


@dataclass(frozen=True)
class GemPlan(DemoPlan):
    """``DemoPlan`` with GEM's knobs; the defaults are the settings whose figures are reported."""

    env_id: str = GUESS_EASY
    seed_episodes: int = 120
    error_rate: float = 0.3  # per turn: a random guess instead of the binary-search one
    sft_steps: int = 150  # loss ~0.06 by then; a step of 8 takes ~0.7 s on a loaded core
    sft_batch: int = 8
    sft_lr: float = 3e-3
    eval_episodes: int = 64
    random_episodes: int = 64
    max_new_tokens: int = 32  # an act call is ~23 tokens
    max_total_tokens: int = 1400  # prompt ~505, a turn ~85: 12 turns of junk still fit
    runs: tuple[str, ...] = ("ipa",)  # add "grpo" for the token-level GRPO baseline
    online_seconds: float = 0.0  # per run; 0: share what the budget leaves
    reward: str = "won"  # "won": 1 iff won, else 0 (see ``won_only``); "graded": GEM's summed reward
    # Measured here (details in the module docstring): group-normalised advantages collapsed the
    # tiny policy into unparseable calls (then every group scores 0 alike and nothing moves again);
    # GEM's graded reward without a baseline reinforced close losses until wins fell 39 % -> 0 %.
    # So: reward 1 iff won, no baseline (failures carry no gradient: self-imitation of wins), and
    # parse errors masked so that a won episode never reinforces its malformed turns.
    rl: dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 1e-3,
            "batch_size": 8,
            "batch_timeout_s": 15.0,
            "group_timeout_s": 15.0,
            "max_staleness": 2,
            "group_baseline": False,
            "mask_errors": True,
            "checkpoint_every": 1,
        }
    )


@dataclass
class GemResult:
    """Win rates (fraction of valid episodes won) and wall times in seconds, per phase."""

    random: float = 0.0
    expert: float = 0.0
    warm: float = 0.0
    after: dict[str, float] = field(default_factory=dict)  # run -> win rate after online training
    versions: dict[str, int] = field(default_factory=dict)  # run -> final policy version
    online: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # run -> curve
    wall: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    sft_loss: list[float] = field(default_factory=list)
    demonstrations: int = 0

    def table(self) -> str:
        rows = [
            ("random guesser (floor)", self.random, self.wall.get("random", 0.0)),
            ("expert (binary search, errs)", self.expert, self.wall.get("seed", 0.0)),
            (f"policy after SFT warm start (v{WARM_VERSION})", self.warm, self.wall.get("warm", 0.0)),
        ]
        for run in ("ipa", "grpo"):
            if run in self.after:
                label = f"after online {run.upper()} (v{self.versions.get(run, 0)})"
                rows.append((label, self.after[run], self.wall.get(run, 0.0)))
        lines = [f"{'policy':<40} {'won':>8} {'wall s':>8}"]
        lines += [f"{name:<40} {rate:>8.1%} {sec:>8.0f}" for name, rate, sec in rows]
        lines.append(f"{'total':<40} {'':>8} {self.wall.get('total', 0.0):>8.0f}")
        for run, curve in self.online.items():
            steps = ", ".join(f"v{v}: {w:.0%} of {n}" for v, n, w in curve)
            lines.append(f"{run} rollouts won by policy version: {steps}")
        return "\n".join(lines)


# --- configuration and players ------------------------------------------------------------------


def gem_config(state: Path, port: int, run: str, plan: GemPlan, loss: str = "ipa") -> Config:
    """``ops.demo.demo_config`` with the GEM task source and a harness sized for its episodes."""
    cfg = demo_config(state, port, run, plan, loss)
    harness = msgspec.structs.replace(
        cfg.rollout.harness,
        max_new_tokens_per_turn=plan.max_new_tokens,
        max_total_tokens=plan.max_total_tokens,
    )
    return msgspec.structs.replace(
        cfg,
        producer=msgspec.structs.replace(cfg.producer, source="gem", env_id=plan.env_id),
        rollout=msgspec.structs.replace(cfg.rollout, harness=harness),
    )


class NoisyGuesser(GuessTheNumberExpert):
    """Binary search through ``act`` calls, except that at every turn it guesses uniformly in the
    game's range with probability ``error_rate`` (1.0: a random player)."""

    def __init__(self, *, tokenizer: Any, error_rate: float, seed: int, version: int = 0) -> None:
        super().__init__(tokenizer=tokenizer, version=version)
        self.error_rate = error_rate
        self._rng = random.Random(seed)

    def _one(self, req: GenRequest) -> Generation:
        text = self.tokenizer.decode(req.prompt_tokens, skip_special_tokens=False)
        guess = next_guess(text)
        if self._rng.random() < self.error_rate:
            found = _RANGE.search(text)
            low, high = (int(found.group(1)), int(found.group(2))) if found else (1, 10)
            guess = self._rng.randint(low, high)
        tokens = encode(self.tokenizer, act_call(f"\\boxed{{{guess}}}"))[: req.max_new_tokens]
        stops = set(req.stop_token_ids or ())
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        return Generation(tokens[:cut], [0.0] * cut, "stop", self.version)


def won(scored: ScoredTrajectory) -> bool:
    return scored.valid and scored.reward >= 1.0


def win_rate(results: Sequence[ScoredTrajectory]) -> float:
    valid = [r for r in results if r.valid]
    return sum(map(won, valid)) / max(1, len(valid))


async def game_tasks(s: Stack, plan: GemPlan, seed: int, count: int, prefix: str) -> list[Task]:
    """``count`` tasks of the plan's env under ``seed``. Their first observations are read in
    sandboxes, ``OBSERVE_BATCH`` per sandbox: one answer must fit the 16 KB output cap of an exec."""
    client = SandboxClient(s.nc)
    batches: dict[int, list[Task]] = {}
    limit = anyio.Semaphore(4)

    async def batch(start: int) -> None:
        async with limit:
            n = min(OBSERVE_BATCH, count - start)
            batches[start] = await gem_tasks(client, plan.env_id, seed=seed, count=n, start=start)

    async with anyio.create_task_group() as tg:
        for start in range(0, count, OBSERVE_BATCH):
            tg.start_soon(batch, start)
    tasks = [scored_as(plan, t) for start in sorted(batches) for t in batches[start]]
    return [msgspec.structs.replace(t, task_id=f"{prefix}-{t.task_id}") for t in tasks]


def won_only(task: Task) -> Task:
    """``task`` without its graded-reward file: the reward worker then scores it by its verify
    command alone, 1.0 iff the game was won, else 0.0."""
    metadata = {k: v for k, v in task.metadata.items() if k != "result_path"}
    return msgspec.structs.replace(task, metadata=metadata)


def scored_as(plan: GemPlan, task: Task) -> Task:
    return won_only(task) if plan.reward == "won" else task


async def producer(s: Stack, cfg: Config, plan: GemPlan, *, task_status: TaskStatus[None]) -> None:
    """``producers.tasks.run`` for the online runs (GEM source, ``max_inflight`` bound, groups),
    with the plan's reward (``scored_as``), which the producer's tasks cannot choose."""
    pub = Publisher(s.js)
    client = SandboxClient(s.nc)
    group = cfg.producer.group_size
    task_status.started()
    for start in itertools.count(0, OBSERVE_BATCH):
        for task in await gem_tasks(
            client, plan.env_id, seed=cfg.producer.seed, count=OBSERVE_BATCH, start=start
        ):
            while True:
                pending, ack_pending, _ = await backlog(s.js, ROLLOUT, cfg.run)
                if cfg.producer.max_inflight - (pending + ack_pending) >= group:
                    break
                await anyio.sleep(0.5)
            for k in range(group):
                sample = TaskSample(
                    run=cfg.run, task=scored_as(plan, task), sample_idx=k, created_at=time.time()
                )
                await pub.publish(subject("tasks", cfg.run), sample, msg_id=sample.msg_id)


async def play(
    s: Stack,
    tasks: Sequence[Task],
    engine_for: Callable[[int], InferenceEngine],
    cfg: Config,
    *,
    run: str = "eval",
    source: str = "online",
    on_scored: Callable[[ScoredTrajectory], Awaitable[None]] | None = None,
) -> list[ScoredTrajectory]:
    """Play and score every task once in real sandboxes, ``plan.concurrency`` at a time."""
    sandbox = SandboxClient(s.nc)
    results: list[ScoredTrajectory] = []
    limit = anyio.Semaphore(cfg.rollout.concurrency)

    async def one(i: int, task: Task) -> None:
        async with limit:
            sample = TaskSample(run=run, task=task, sample_idx=0)
            traj = await run_episode(
                sample,
                engine=engine_for(i),
                sandbox=sandbox,
                settings=cfg.rollout.harness,
                source=source,
                registry=registry_for(task),
            )
            scored = await score(
                msgspec.structs.replace(traj, task=task), sandbox, cfg.reward.verify_timeout_s
            )
            results.append(scored)
            if on_scored is not None:
                await on_scored(scored)

    async with anyio.create_task_group() as tg:
        for i, task in enumerate(tasks):
            tg.start_soon(one, i, task)
    return results


def guessers(tokenizer: Any, error_rate: float, seed: int) -> Callable[[int], InferenceEngine]:
    return lambda i: NoisyGuesser(tokenizer=tokenizer, error_rate=error_rate, seed=seed * 100_003 + i)


# --- phases -------------------------------------------------------------------------------------


async def seed_phase(s: Stack, plan: GemPlan, tokenizer: Any) -> float:
    """Expert episodes published as scored SFT replays of run ``seed``; the lake keeps them.
    Returns the expert's win rate."""
    from consumers import lake

    cfg = gem_config(s.state, s.port, SEED_RUN, plan)
    tasks = await game_tasks(s, plan, plan.seed + EXPERT_SEED_OFFSET, plan.seed_episodes, "expert")
    pub = Publisher(s.js)

    async def publish(scored: ScoredTrajectory) -> None:
        scored = msgspec.structs.replace(scored, replay=True, replay_mode="sft")
        await pub.publish(subject("scored", SEED_RUN), scored, msg_id=f"scored:{scored.traj.traj_id}")

    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: lake.run(cfg, s.js, task_status=task_status))
        engines = guessers(tokenizer, plan.error_rate, plan.seed)
        results = await play(s, tasks, engines, cfg, run=SEED_RUN, source="expert", on_scored=publish)
        sql = f"SELECT count(*) AS n FROM trajectories WHERE run = '{SEED_RUN}'"
        await wait_for_rows(cfg.lake_root, sql, len(tasks))
        tg.cancel_scope.cancel()
    return win_rate(results)


def sft_warm_start(
    lake_root: Path, base: Path, out_root: Path, plan: GemPlan
) -> tuple[Path, list[float], int]:
    """SFT on the expert's won episodes from the lake; the checkpoint (version 1, fresh optimiser
    at the online rate), the losses and the number of demonstrations."""
    from consumers.lake import load_scored

    samples = load_scored(lake_root, WON_SQL)
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


async def evaluate(s: Stack, policy_dir: Path, tasks: Sequence[Task], plan: GemPlan, cfg: Config) -> float:
    """Win rate of the policy at ``policy_dir`` on ``tasks``, in real sandboxes."""
    from agent_harness.torch_engine import TorchEngine

    engine = await anyio.to_thread.run_sync(lambda: TorchEngine(policy_dir, seed=plan.seed))
    batcher = Batcher(engine, max_batch=cfg.rollout.concurrency)
    return win_rate(await play(s, tasks, lambda _: batcher, cfg))


async def online_phase(s: Stack, run: str, loss: str, warm: Path, plan: GemPlan, seconds: float) -> Path:
    """The real workers for ``seconds`` from the warm start: ``ops.demo.online_phase`` with the GEM
    configuration and this module's ``producer``."""
    from agent_harness.torch_engine import TorchEngine
    from consumers import lake, reward, rollout
    from learner import worker

    cfg = gem_config(s.state, s.port, run, plan, loss)
    ckpt_root = cfg.state / "checkpoints" / run
    if latest_checkpoint(ckpt_root) is None:
        shutil.copytree(warm, checkpoint_path(ckpt_root, 0))
    engine = await anyio.to_thread.run_sync(lambda: TorchEngine(warm, seed=plan.seed, version=WARM_VERSION))
    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: lake.run(cfg, s.js, task_status=task_status))
            await tg.start(lambda task_status: worker.run(cfg, s.js, task_status=task_status))
            await tg.start(lambda task_status: reward.run(cfg, s.js, s.nc, task_status=task_status))
            await tg.start(
                lambda task_status: rollout.run(cfg, s.js, s.nc, engine=engine, task_status=task_status)
            )
            await tg.start(lambda task_status: producer(s, cfg, plan, task_status=task_status))
    final = latest_checkpoint(ckpt_root)
    assert final is not None
    return final


def online_curve(lake_root: Path, run: str, buckets: int = 4) -> list[tuple[int, int, float]]:
    """The run's rollouts in ``buckets`` consecutive version ranges: (first version, n, win rate)."""
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


async def _timed(result: GemResult, phase: str, job: Awaitable[Any]) -> Any:
    t = time.monotonic()
    value = await job
    result.wall[phase] = time.monotonic() - t
    return value


async def run_gem_demo(out: Path, plan: GemPlan = GemPlan()) -> GemResult:
    """Run every phase in ``out/state``, write the report and ``demo.txt`` into ``out``."""
    import torch
    from transformers import AutoTokenizer

    from ops.report import write_report

    # One thread: the sandboxes' Python processes and the workers share the same few cores, and
    # two contending torch threads made an SFT step ~5x slower here.
    torch.set_num_threads(1)
    t_start = time.monotonic()
    state = (out / "state").resolve()
    state.mkdir(parents=True, exist_ok=True)
    base = create_tiny_policy(state / "policy" / "base", seed=plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    result = GemResult()
    async with stack(state, [SEED_RUN, *plan.runs]) as s:
        cfg = gem_config(state, s.port, "eval", plan)
        held_out = await game_tasks(s, plan, EVAL_SEED + plan.seed, plan.eval_episodes, "eval")
        floor_tasks = held_out[: plan.random_episodes]
        floor = play(s, floor_tasks, guessers(tokenizer, 1.0, plan.seed + 1), cfg)
        result.random = win_rate(await _timed(result, "random", floor))
        result.expert = await _timed(result, "seed", seed_phase(s, plan, tokenizer))
        log.info("gem_demo_seeded", expert=result.expert, random=result.random)
        t = time.monotonic()
        warm, result.sft_loss, result.demonstrations = await anyio.to_thread.run_sync(
            lambda: sft_warm_start(cfg.lake_root, base, state / "warm", plan)
        )
        result.wall["sft"] = time.monotonic() - t
        result.warm = await evaluate(s, warm, held_out, plan, cfg)
        result.wall["warm"] = time.monotonic() - t
        eval_s = result.wall["warm"] - result.wall["sft"]
        log.info("gem_demo_warm", won=result.warm, demonstrations=result.demonstrations)
        for run in plan.runs:
            left = plan.minutes * 60 - (time.monotonic() - t_start)
            share = left / (len(plan.runs) - plan.runs.index(run)) - eval_s  # its evaluation
            per_run = plan.online_seconds or max(60.0, share)
            t = time.monotonic()
            final = await online_phase(s, run, run, warm, plan, per_run)
            result.versions[run] = final_version(final)
            result.after[run] = await evaluate(s, final, held_out, plan, cfg)
            result.wall[run] = time.monotonic() - t
            result.online[run] = online_curve(cfg.lake_root, run)
            log.info("gem_demo_online", run=run, won=result.after[run], version=result.versions[run])
    result.wall["total"] = time.monotonic() - t_start
    await anyio.to_thread.run_sync(lambda: write_report(state / "lake", out))
    (out / "demo.txt").write_text(result.table() + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from ops.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="total budget")
    parser.add_argument("--out", type=Path, default=Path("demo-gem"), help="output directory")
    parser.add_argument("--runs", default=",".join(GemPlan.runs), help="online runs: ipa, grpo or both")
    parser.add_argument("--seed-episodes", type=int, default=GemPlan.seed_episodes)
    parser.add_argument("--eval-episodes", type=int, default=GemPlan.eval_episodes)
    parser.add_argument("--error-rate", type=float, default=GemPlan.error_rate)
    parser.add_argument("--sft-steps", type=int, default=GemPlan.sft_steps)
    parser.add_argument("--temperature", type=float, default=GemPlan.temperature)
    parser.add_argument("--rl-lr", type=float, default=None, help="online learning rate")
    parser.add_argument("--rl-batch", type=int, default=None, help="online batch size")
    args = parser.parse_args(argv)
    configure_logging("info")
    plan = GemPlan()
    rl = dict(plan.rl)
    if args.rl_lr is not None:
        rl["lr"] = args.rl_lr
    if args.rl_batch is not None:
        rl["batch_size"] = args.rl_batch
    plan = replace(
        plan,
        minutes=args.minutes,
        runs=tuple(r for r in args.runs.split(",") if r),
        seed_episodes=args.seed_episodes,
        eval_episodes=args.eval_episodes,
        random_episodes=min(plan.random_episodes, args.eval_episodes),
        error_rate=args.error_rate,
        sft_steps=args.sft_steps,
        temperature=args.temperature,
        rl=rl,
    )
    result = anyio.run(run_gem_demo, args.out, plan)
    print(result.table())
    print(f"report: {args.out}/success_by_version.png (success there = mean graded reward)")


if __name__ == "__main__":
    main()
