"""The command line of the learning demonstrations (``just demo``, ``just demo-gem``): every knob of
a ``DemoPlan`` that a run is compared by, its defaults those of the plan given."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import anyio

from ops.demo import ARMS, DemoPlan, run_demo
from ops.demo import __doc__ as DEMO_DOC


def main(argv: Sequence[str] | None = None, plan: DemoPlan = DemoPlan(), out: str = "demo-out") -> None:
    """The command line of a demonstration whose defaults are ``plan``."""
    from ops.logs import configure_logging

    parser = argparse.ArgumentParser(description=(DEMO_DOC or "").split("\n\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=plan.minutes, help="total budget")
    parser.add_argument("--out", type=Path, default=Path(out), help="output directory")
    parser.add_argument(
        "--runs", default=",".join(plan.runs), help=f"online arms, comma-separated: {', '.join(ARMS)}"
    )
    parser.add_argument(
        "--online-samples",
        type=int,
        default=plan.online_samples,
        help="stop each online run once its learner trained this many online samples (0: time shares)",
    )
    parser.add_argument("--seed", type=int, default=plan.seed, help="model, expert, SFT and held-out tasks")
    for flag, values, text in [  # comma-separated integers
        (
            "--online-seeds",
            plan.online_seeds,
            "run every arm once per seed, all from one warm start (default: --seed)",
        ),
        ("--levels", plan.levels, "task levels"),
        ("--expert-levels", plan.expert_levels, "levels the expert demonstrates (default: all of --levels)"),
    ]:
        parser.add_argument(flag, type=_ints, default=",".join(map(str, values)), help=text)
    parser.add_argument(
        "--note-extra", type=float, default=plan.note_extra, help="level-2 notes with a second line"
    )
    parser.add_argument(
        "--expert-shortcut",
        type=float,
        default=plan.expert_shortcut,
        help="how often the expert copies the whole level-2 note instead of reading it",
    )
    parser.add_argument("--seed-episodes", type=int, default=plan.seed_episodes)
    parser.add_argument("--eval-episodes", type=int, default=plan.eval_episodes)
    parser.add_argument("--error-rate", type=float, default=plan.error_rate)
    parser.add_argument("--sft-steps", type=int, default=plan.sft_steps)
    parser.add_argument(
        "--sft-final-lr", type=float, default=plan.sft_final_lr, help="SFT rate at the last step (fraction)"
    )
    parser.add_argument("--temperature", type=float, default=plan.temperature)
    parser.add_argument("--rl-lr", type=float, default=plan.rl["lr"], help="online learning rate")
    parser.add_argument("--rl-batch", type=int, default=plan.rl["batch_size"], help="online batch size")
    for flag, key, text in [
        ("--group-baseline", "group_baseline", "group-normalised advantages online"),
        ("--dynamic-sampling", "dynamic_sampling", "drop task groups whose rewards are all equal"),
    ]:
        on = bool(plan.rl.get(key, False))
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=on, help=text)
    args = parser.parse_args(argv)
    if args.online_samples < 0:
        parser.error("--online-samples: give 0 (time shares) or a positive count")
    unknown = [r for r in args.runs.split(",") if r and r not in ARMS]
    if unknown:
        parser.error(f"--runs: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    configure_logging("info")
    plan = replace(
        plan,
        minutes=args.minutes,
        runs=tuple(r for r in args.runs.split(",") if r),
        online_seeds=args.online_seeds,
        online_samples=args.online_samples,
        seed=args.seed,
        levels=args.levels or plan.levels,
        expert_levels=args.expert_levels,
        note_extra=args.note_extra,
        expert_shortcut=args.expert_shortcut,
        seed_episodes=args.seed_episodes,
        eval_episodes=args.eval_episodes,
        random_episodes=min(plan.random_episodes, args.eval_episodes),
        error_rate=args.error_rate,
        sft_steps=args.sft_steps,
        sft_final_lr=args.sft_final_lr,
        temperature=args.temperature,
        rl={
            **plan.rl,
            "lr": args.rl_lr,
            "batch_size": args.rl_batch,
            "group_baseline": args.group_baseline,
            "dynamic_sampling": args.dynamic_sampling,
        },
    )
    result = anyio.run(run_demo, args.out, plan)
    print(result.table())
    print(f"plots: {args.out}/demo.png, {args.out}/success_by_version.png")


def _ints(text: str) -> tuple[int, ...]:
    """Comma-separated distinct non-negative integers (levels, seeds), for argparse."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative integers")
    return values
