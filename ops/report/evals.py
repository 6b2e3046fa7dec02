"""The report's evaluation part: pass@1 and pass@k by policy version (lake table ``evals``, written
by ``rollstream eval``) next to the training success rate of the same versions."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ops.evaluation.passk import Estimate, estimate
from ops.report.data import NoData, column, pooled_versions, rows, scope, where
from ops.report.plots import PALETTE, WIDE, _figure, _legend

EVAL_PLOT = "eval_by_version.png"


@dataclass(frozen=True, slots=True)
class EvalPoint:
    """pass@1 and pass@k of one policy version on one task set (all its evaluations pooled)."""

    run: str
    task_set: str
    version: int
    attempts: int
    pass1: Estimate
    passk: Estimate


def eval_points(lake: Path, run: str | None) -> list[EvalPoint]:
    """Per (run, task set, version): pass@1 and pass@k, with k the fewest attempts any task had in
    that task set (so every point of a line uses the same k)."""
    found = rows(
        lake,
        "SELECT run, task_set, policy_version AS v, task_id, list(passed) AS passed FROM evals "
        f"{where(run, 'agent = ' + chr(39) + 'policy' + chr(39))} GROUP BY ALL ORDER BY ALL",
    )
    groups: dict[tuple[str, str, int], dict[str, list[bool]]] = defaultdict(dict)
    for r in found:
        groups[(r["run"], r["task_set"], r["v"])][r["task_id"]] = list(r["passed"])
    k_of: dict[tuple[str, str], int] = {}
    for (name, tasks, _), per_task in groups.items():
        fewest = min(len(a) for a in per_task.values())
        k_of[(name, tasks)] = min(k_of.get((name, tasks), fewest), fewest)
    return [
        EvalPoint(
            run=name,
            task_set=tasks,
            version=v,
            attempts=sum(len(a) for a in per_task.values()),
            pass1=estimate(per_task, 1),
            passk=estimate(per_task, k_of[(name, tasks)]),
        )
        for (name, tasks, v), per_task in sorted(groups.items())
    ]


def _band(ax: object, x: np.ndarray, points: list[Estimate], **style: object) -> None:
    y = np.array([e.value for e in points])
    low, high = np.array([e.low for e in points]), np.array([e.high for e in points])
    if len(x) == 1:
        ax.errorbar(x, y, yerr=[y - low, high - y], capsize=4, **style)  # type: ignore[attr-defined]
        return
    ax.plot(x, y, **style)  # type: ignore[attr-defined]
    ax.fill_between(x, low, high, color=style["color"], alpha=0.12, lw=0)  # type: ignore[attr-defined]


def plot_eval_by_version(lake: Path, run: str | None) -> Figure:
    """pass@1 (solid) and pass@k (dashed) by version with 95 % intervals, per run and task set, and
    the run's online training success rate by version (dotted) for comparison."""
    points = eval_points(lake, run)
    if not points:
        raise NoData("no policy evaluations (rollstream eval)")
    fig, (ax,) = _figure(WIDE)
    lines = sorted({(p.run, p.task_set) for p in points})
    multi = len(lines) > 1
    for i, key in enumerate(lines):
        mine = [p for p in points if (p.run, p.task_set) == key]
        colour = PALETTE[i % len(PALETTE)]
        label = f"{key[0]} · {Path(key[1]).name}" if multi else Path(key[1]).name
        x = np.array([p.version for p in mine], dtype=float)
        k = mine[0].passk.k
        _band(ax, x, [p.pass1 for p in mine], color=colour, ls="-", marker="o", lw=2, label=f"pass@1 {label}")
        if k > 1:
            _band(
                ax,
                x,
                [p.passk for p in mine],
                color=colour,
                ls="--",
                marker="s",
                lw=2,
                label=f"pass@{k} {label}",
            )
    pooled = pooled_versions(lake, run)
    for i, name in enumerate(sorted({p.run for p in points})):
        bins = pooled.series.get((name, "online"))
        if bins:
            style: dict[str, Any] = {
                "color": "#555555" if not multi else PALETTE[i % len(PALETTE)],
                "ls": ":",
                "lw": 1.5,
            }
            ax.plot(
                column(bins, "version"),
                column(bins, "mean"),
                marker=".",
                label=f"training success {name}",
                **style,
            )
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("policy version")
    ax.set_ylabel("pass rate, band: 95 % interval over tasks")
    ax.set_title(f"Held-out evaluation by policy version ({scope(run)})")
    _legend(fig, ax)
    return fig


def eval_lines(lake: Path, run: str | None) -> list[str]:
    """Summary lines: pass@1 and pass@k of the first and the last version evaluated per task set."""
    points = eval_points(lake, run)
    lines = []
    for name, tasks in sorted({(p.run, p.task_set) for p in points}):
        mine = [p for p in points if (p.run, p.task_set) == (name, tasks)]
        shown = [mine[0]] if len(mine) == 1 else [mine[0], mine[-1]]
        text = "; ".join(f"v{p.version} pass@1 {p.pass1} pass@{p.passk.k} {p.passk}" for p in shown)
        lines.append(f"eval          {name} on {Path(tasks).name} ({len(mine)} versions): {text}")
    return lines
