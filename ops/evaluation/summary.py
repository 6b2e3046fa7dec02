"""What an evaluation's attempts add up to: pass@1 and pass@k with 95 % intervals per policy, a
comparison table of several policies, and the tasks whose oracle failed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from consumers.lake import EvalRecord
from ops.evaluation.passk import Estimate, estimate


@dataclass(frozen=True, slots=True)
class Summary:
    """One policy (or the oracle) over one task set."""

    eval_id: str
    policy: str
    version: int
    tasks: int
    attempts: int
    invalid: int
    pass1: Estimate
    passk: Estimate
    mean_reward: float
    mean_tokens: float
    mean_turns: float
    wall_s: float


def outcomes(records: Sequence[EvalRecord]) -> dict[str, list[bool]]:
    """Each task's attempts, passed or not (an invalid attempt counts as not passed)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r.task_id].append(r.passed)
    return dict(by_task)


def summarize(records: Sequence[EvalRecord], k: int, wall_s: float = 0.0) -> Summary:
    """pass@1 and pass@k of one evaluation's attempts (k is capped by the attempts per task)."""
    first = records[0]
    per_task = outcomes(records)
    k = min(k, min(len(a) for a in per_task.values()))
    n = len(records)
    return Summary(
        eval_id=first.eval_id,
        policy=first.policy,
        version=first.policy_version,
        tasks=len(per_task),
        attempts=n,
        invalid=sum(not r.valid for r in records),
        pass1=estimate(per_task, 1),
        passk=estimate(per_task, k),
        mean_reward=sum(r.reward for r in records) / n,
        mean_tokens=sum(r.num_tokens for r in records) / n,
        mean_turns=sum(r.turns for r in records) / n,
        wall_s=wall_s,
    )


def broken(records: Sequence[EvalRecord]) -> dict[str, str]:
    """Tasks with an attempt that did not pass -> why (for the oracle: the task is broken)."""
    reasons: dict[str, str] = {}
    for r in records:
        if r.passed or r.task_id in reasons:
            continue
        why = r.invalid_reason or f"reward {r.reward:g}"
        tail = [line for line in r.verifier_output.splitlines() if line.strip()][-3:]
        reasons[r.task_id] = why + ("" if not tail else ": " + " | ".join(tail))
    return reasons


def _ci(e: Estimate) -> str:
    return f"{e.value:.2f} [{e.low:.2f},{e.high:.2f}]"


def table(summaries: Sequence[Summary]) -> Table:
    """pass@1 and pass@k per policy with 95 % intervals; with two or more, the change vs the first."""
    k = summaries[0].passk.k
    t = Table(title=f"pass@1, pass@{k} [95 % interval over tasks]")
    cols = ["policy", "ver", "tasks×k", "invalid", "pass@1", f"pass@{k}", "reward", "tokens"]
    cols += ["Δ pass@1", f"Δ pass@{k}"] if len(summaries) > 1 else []
    for col in cols:
        t.add_column(col, justify="left" if col == "policy" else "right")
    base = summaries[0]
    for s in summaries:
        version = "-" if s.version < 0 else str(s.version)
        row = [s.policy, version, f"{s.tasks}×{s.attempts // max(s.tasks, 1)}", str(s.invalid)]
        row += [_ci(s.pass1), _ci(s.passk), f"{s.mean_reward:.2f}", f"{s.mean_tokens:.0f}"]
        if len(summaries) > 1:
            row += [f"{s.pass1.value - base.pass1.value:+.2f}", f"{s.passk.value - base.passk.value:+.2f}"]
        t.add_row(*row)
    return t
