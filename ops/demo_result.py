"""The figures of a learning demonstration (``ops.demo``): success rates with their intervals, wall
times per phase, the table ``demo.txt``, the same figures as ``demo.json`` (for comparing runs) and
the bar chart ``demo.png``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# How the table names an online arm (``ops.demo.ARMS``); any other run is named in capitals.
ARM_NAMES = {"ipa": "IPA", "grpo": "GRPO", "ipa_nois": "IPA w/o failure IS"}


def arm_label(arm: str, seeds: int = 1) -> str:
    """An arm's name in tables and plots; ``seeds`` > 1: its runs pooled over that many seeds."""
    return ARM_NAMES.get(arm, arm.upper()) + (f", {seeds} seeds pooled" if seeds > 1 else "")


@dataclass(frozen=True)
class Rate:
    """Successes out of valid episodes, with its 95 % Wilson interval."""

    wins: int
    n: int

    @property
    def value(self) -> float:
        return self.wins / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        from ops.report import wilson_interval

        return wilson_interval(self.wins, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{self.value:6.1%}  [{lo:4.0%}, {hi:4.0%}]  n={self.n}"


Curve = list[tuple[int, int, float]]
"""Online rollouts in consecutive policy-version ranges: (first version, episodes, success rate)."""


@dataclass
class DemoResult:
    """Success rates (of valid episodes) and wall times in seconds, per phase."""

    title: str = "Learning demo"
    random: Rate | None = None  # the floor: a player that errs at every step (when measured)
    expert: Rate = Rate(0, 0)
    warm: Rate = Rate(0, 0)
    after: dict[str, Rate] = field(default_factory=dict)  # run -> success after online training
    versions: dict[str, int] = field(default_factory=dict)  # run -> final policy version
    online: dict[str, Curve] = field(default_factory=dict)  # run -> its rollouts' success by version
    wall: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    sft_loss: list[float] = field(default_factory=list)
    demonstrations: int = 0  # successful expert episodes the warm start imitated
    trained: dict[str, int] = field(default_factory=dict)  # run -> online samples its learner trained
    arms: dict[str, tuple[str, int]] = field(default_factory=dict)  # run -> (arm, seed); default (run, 0)

    def groups(self) -> dict[str, list[str]]:
        """Online runs by arm, in the order they ran (a run without ``arms`` is its own arm)."""
        out: dict[str, list[str]] = {}
        for run in self.after:
            out.setdefault(self.arms.get(run, (run, 0))[0], []).append(run)
        return out

    def name(self, run: str) -> str:
        """How the table names an online run: its arm, and its seed when the arm ran several."""
        arm, seed = self.arms.get(run, (run, 0))
        several = len(self.groups().get(arm, ())) > 1
        return arm_label(arm) + (f", seed {seed}" if several else "")

    def pooled(self, *, all_arms: bool = False) -> dict[str, tuple[Rate, list[Rate]]]:
        """Arms run with several seeds (``all_arms``: every arm): successes and episodes summed
        over their runs, and each run's rate."""
        out = {}
        for arm, runs in self.groups().items():
            rates = [self.after[r] for r in runs]
            if all_arms or len(rates) > 1:
                out[arm] = (Rate(sum(r.wins for r in rates), sum(r.n for r in rates)), rates)
        return out

    def rows(self) -> list[tuple[str, Rate, float]]:
        rows = [] if self.random is None else [("random player (floor)", self.random, self.wall["random"])]
        rows += [
            ("scripted expert (errs)", self.expert, self.wall.get("seed", 0.0)),
            ("policy after SFT warm start", self.warm, self.wall.get("warm", 0.0)),
        ]
        for run, rate in self.after.items():
            label = f"after online {self.name(run)} (v{self.versions.get(run, 0)})"
            rows.append((label, rate, self.wall.get(run, 0.0)))
        return rows

    def to_json(self) -> bytes:
        """Per arm (each row of the table): successes, episodes, rate and 95 % interval."""
        keys = ["random"] * (self.random is not None) + ["expert", "warm", *self.after]
        arms = [
            {
                "arm": key,
                "label": name,
                "successes": rate.wins,
                "episodes": rate.n,
                "rate": rate.value,
                "ci95": list(rate.interval),
                "wall_s": round(sec, 1),
                **({"version": self.versions[key]} if key in self.versions else {}),
                **({"trained": self.trained[key]} if key in self.trained else {}),
                **({"method": self.arms[key][0], "seed": self.arms[key][1]} if key in self.arms else {}),
            }
            for key, (name, rate, sec) in zip(keys, self.rows(), strict=True)
        ]
        pooled = [
            {
                "method": arm,
                "label": arm_label(arm, len(rates)),
                "successes": total.wins,
                "episodes": total.n,
                "rate": total.value,
                "ci95": list(total.interval),
                "seed_rates": [r.value for r in rates],
            }
            for arm, (total, rates) in self.pooled().items()
        ]
        doc = {
            "title": self.title,
            "arms": arms,
            "pooled": pooled,
            "demonstrations": self.demonstrations,
            "wall_s": self.wall,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    def table(self) -> str:
        rows = self.rows()
        w = max(34, *(len(name) + 1 for name, _, _ in rows))
        lines = [f"{'policy':<{w}} {'success  [95% CI]  episodes':<32} {'wall s':>7}"]
        lines += [f"{name:<{w}} {rate!s:<32} {sec:>7.0f}" for name, rate, sec in rows]
        lines.append(f"{'total':<{w}} {'':<32} {self.wall.get('total', 0.0):>7.0f}")
        for arm, (total, rates) in self.pooled().items():
            seeds = ", ".join(f"{r.value:.1%}" for r in rates)
            lines.append(f"{arm_label(arm, len(rates)):<{w}} {total!s:<32} seeds: {seeds}")
        if self.trained:
            lines.append("online samples trained: " + ", ".join(f"{r} {n}" for r, n in self.trained.items()))
        for run, curve in self.online.items():
            steps = ", ".join(f"v{v}: {w:.0%} of {n}" for v, n, w in curve)
            lines.append(f"{run} rollouts successful by policy version: {steps}")
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """The table as a bar chart with 95 % intervals (``demo.png``)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter

        rows, dots = self.rows(), {}
        if self.pooled():  # one bar per arm, its seeds pooled, and each seed's rate as a dot
            rows = rows[: len(rows) - len(self.after)]
            groups = self.groups()
            for arm, (total, rates) in self.pooled(all_arms=True).items():
                rows.append(
                    (arm_label(arm, len(rates)), total, sum(self.wall.get(r, 0.0) for r in groups[arm]))
                )
                dots[len(rows) - 1] = [r.value for r in rates]
        fig = Figure(figsize=(8.0, 1.2 + 0.6 * len(rows)), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ys = list(range(len(rows)))[::-1]
        values = [r.value for _, r, _ in rows]
        lo = [r.value - r.interval[0] for _, r, _ in rows]
        hi = [r.interval[1] - r.value for _, r, _ in rows]
        colours = ["#bcbd22"] * (self.random is not None) + ["#7f7f7f", "#2ca02c", "#d62728", "#1f77b4"]
        colours += ["#9467bd", "#8c564b", "#e377c2"]
        ax.barh(ys, values, xerr=[lo, hi], color=colours[: len(rows)], alpha=0.8, capsize=4)
        ax.axvline(self.expert.value, color="#7f7f7f", ls="--", lw=1, label="expert")
        if self.warm.n:  # an arm above the warm start has its whole interval right of this line
            ax.axvline(self.warm.interval[1], color="#2ca02c", ls=":", lw=1.5, label="warm start: upper 95 %")
            fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
        for y, (_, rate, sec) in zip(ys, rows, strict=True):
            ax.text(0.01, y, f" {rate.value:.1%} (n={rate.n}, {sec:.0f} s)", va="center", color="white")
        for i, values in dots.items():
            ax.plot(values, [ys[i]] * len(values), "o", color="black", ms=4, label=None)
        ax.set_yticks(ys, [name for name, _, _ in rows])
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        seeds = "; dots: each seed's rate" if dots else ""
        ax.set_xlabel(f"success rate on held-out tasks (bars: 95 % Wilson interval{seeds})")
        minutes = f"{self.wall.get('total', 0.0) / 60:.0f} min on this machine"
        ax.set_title(f"{self.title}\n{minutes}", fontsize=10)
        fig.savefig(path)
        return path
