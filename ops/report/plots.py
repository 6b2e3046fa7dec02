"""The report's plots: matplotlib's object API (``Figure`` on the Agg canvas), no pyplot state.

Each ``plot_*`` takes the lake and a run (``None``: every run) and returns a ``Figure``, or raises
``NoData`` naming what is missing. Colours, line styles and markers are consistent across plots:
colour by run, line style and marker by source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ops.report.data import ONLINE, NoData, column, one, pooled_versions, rows, scope, where

DPI = 110
WIDE = (9.0, 5.0)  # inches: 990 x 550 px at DPI
TALL = (9.0, 6.5)  # two stacked panels
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PLOTS = ("success_by_version.png", "reward_by_version.png", "staleness.png", "throughput.png", "loss.png")

SOURCE_STYLES = {"online": ("-", "o"), "expert": ("--", "s"), "replay": (":", "D"), "proxy": ("-.", "^")}
RUN_STYLES = ("-", "--", "-.", ":")  # so two runs with identical data stay distinguishable


class Series:
    """Styles the lines of a plot consistently: colour by run, line style and marker by source."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        runs = sorted({r for r, _ in keys})
        self.multi_run = len(runs) > 1
        self.multi_source = len({s for _, s in keys}) > 1
        self.colours = {run: PALETTE[i % len(PALETTE)] for i, run in enumerate(runs)}
        self.run_styles = {run: RUN_STYLES[i % len(RUN_STYLES)] for i, run in enumerate(runs)}

    def label(self, key: tuple[str, str]) -> str:
        run, source = key
        if self.multi_run and self.multi_source:
            return f"{run} · {source}"
        return source if self.multi_source else run

    def style(self, key: tuple[str, str], points: int) -> dict[str, Any]:
        run, source = key
        ls, marker = SOURCE_STYLES.get(source, ("-", "v"))
        if not self.multi_source:
            ls, marker = self.run_styles[run], "o"
        return {
            "color": self.colours[run],
            "ls": ls,
            "lw": 2,
            "label": self.label(key),
            "marker": marker if points <= 40 else None,
            "ms": 6 if points <= 2 else 4,
        }


def _figure(size: tuple[float, float], rows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def _legend(fig: Figure, ax: Axes, title: str | None = None) -> None:
    """One legend below the axes, outside them, so it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(len(handles), 4),
            title=title,
            frameon=False,
        )


def plot_success_by_version(lake: Path, run: str | None) -> Figure:
    """Success rate by policy version, one line per run/source with a 95 % Wilson band.

    Consecutive versions are pooled (``version_bins``) so that each point rests on enough
    trajectories to show a trend; the light bars count the trajectories of each bin per run.
    """
    pooled = pooled_versions(lake, run)
    if not pooled.series:
        raise NoData("no valid trajectories")
    names = Series(list(pooled.series))
    fig, (ax,) = _figure(WIDE)
    counts = ax.twinx()
    share = 0.9 / len(pooled.runs)
    for i, (name, bins) in enumerate(sorted(pooled.runs.items())):
        lo, hi = column(bins, "lo"), column(bins, "hi")
        spans = (hi - lo + 1) * share  # runs side by side inside each bin
        centres = (lo + hi) / 2 + (i - (len(pooled.runs) - 1) / 2) * spans
        counts.bar(centres, column(bins, "n"), width=spans, color=names.colours[name], alpha=0.15)
    for key, bins in sorted(pooled.series.items()):
        x, y = column(bins, "version"), column(bins, "mean")
        low, high = column(bins, "low"), column(bins, "high")
        style = {**names.style(key, len(bins)), "label": names.label(key) + pooled.width_note(key[0])}
        if len(bins) == 1:  # one point: a marker with its interval, no line
            ax.errorbar(x, y, yerr=np.clip([y - low, high - y], 0, 1), capsize=4, elinewidth=1.5, **style)
            continue
        ax.plot(x, y, **style)
        ax.fill_between(x, low, high, color=style["color"], alpha=0.15, lw=0)
    ax.set_zorder(counts.get_zorder() + 1)  # lines above the bars
    ax.patch.set_visible(False)
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"policy version (oldest weights in the trajectory){pooled.note()}")
    ax.set_ylabel("success rate (mean reward), band: 95 % Wilson")
    per = "bin" if any(w > 1 for w in pooled.widths.values()) else "version"
    counts.set_ylabel(f"valid trajectories per {per} (light bars)", color="#555555")
    counts.set_ylim(0, max(b.n for bins in pooled.runs.values() for b in bins) * 3.5)  # bars stay low
    counts.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Success rate by policy version ({scope(run)})")
    _legend(fig, ax, "run · source" if names.multi_run and names.multi_source else None)
    return fig


def plot_reward_by_version(lake: Path, run: str | None) -> Figure:
    """Mean reward ± one standard deviation by policy version, pooled as in the success plot."""
    pooled = pooled_versions(lake, run)
    if not pooled.series:
        raise NoData("no valid trajectories")
    names = Series(list(pooled.series))
    fig, (ax,) = _figure(WIDE)
    step = 0.6 / len(pooled.series)
    for i, (key, bins) in enumerate(sorted(pooled.series.items())):
        # side by side within a bin, so error bars do not hide each other
        offset = (i - (len(pooled.series) - 1) / 2) * step * pooled.widths[key[0]]
        ax.errorbar(
            column(bins, "version") + offset,
            column(bins, "mean"),
            yerr=column(bins, "std"),
            capsize=3,
            elinewidth=1.2,
            **{**names.style(key, len(bins)), "label": names.label(key) + pooled.width_note(key[0])},
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"policy version (oldest weights in the trajectory){pooled.note()}")
    ax.set_ylabel("reward of valid trajectories (mean ± 1 std)")
    ax.set_title(f"Reward by policy version ({scope(run)})")
    _legend(fig, ax, "run · source" if names.multi_run and names.multi_source else None)
    return fig


TRAINED_COLOUR = "#2ca02c"
DROP_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#e377c2", "#17becf", "#bcbd22")
MAX_DROP_KINDS = 7  # drop reasons drawn apart; rarer ones are pooled into one "other" bar


def drop_colours(n: int) -> list[str]:
    """``n`` distinct colours for drop reasons: the palette, then evenly spaced colormap colours."""
    if n <= len(DROP_PALETTE):
        return list(DROP_PALETTE[:n])
    cmap = colormaps["nipy_spectral"]
    return [to_hex(cmap(x)) for x in np.linspace(0.05, 0.95, n)]


def staleness_kinds(counts: dict[str, int]) -> dict[str, str]:
    """Each kind (``trained`` or ``dropped: <reason>``) -> the bar it is drawn in: ``trained``
    first, the ``MAX_DROP_KINDS`` most common reasons, then one ``dropped: other`` for the rest."""
    drops = sorted((k for k in counts if k != "trained"), key=lambda k: (-counts[k], k))
    kept = drops if len(drops) <= MAX_DROP_KINDS + 1 else drops[:MAX_DROP_KINDS]
    other = f"dropped: other ({len(drops) - len(kept)} reasons)"
    order = (["trained"] if "trained" in counts else []) + sorted(kept)
    labels = {kind: kind for kind in order}
    return labels | {kind: other for kind in drops if kind not in labels}


def plot_staleness(lake: Path, run: str | None) -> Figure:
    """Staleness of online samples, trained vs dropped (by reason) stacked, with the bound marked."""
    online = where(run, ONLINE, "staleness IS NOT NULL")
    found = rows(
        lake,
        "SELECT staleness, CASE WHEN fate = 'trained' THEN 'trained' ELSE 'dropped: ' || "
        "coalesce(nullif(reason, ''), 'unknown') END AS kind, count(*) AS n FROM train_log "
        f"{online} GROUP BY ALL ORDER BY ALL",
    )
    if not found:
        raise NoData("no online train_log rows")
    bound_rows = rows(lake, f"SELECT DISTINCT max_staleness AS b FROM train_log {online} ORDER BY 1")
    bounds = [r["b"] for r in bound_rows if r["b"] is not None]
    replayed = one(lake, f"SELECT count(*) AS n FROM train_log {where(run, f'NOT {ONLINE}')}")["n"]
    stalenesses = [r["staleness"] for r in found]
    xs = np.arange(min([0, *stalenesses]), max([*stalenesses, *bounds]) + 1)
    totals: dict[str, int] = {}
    for r in found:
        totals[r["kind"]] = totals.get(r["kind"], 0) + r["n"]
    bar_of = staleness_kinds(totals)
    bars = list(dict.fromkeys(bar_of.values()))
    heights = {bar: np.zeros(len(xs)) for bar in bars}
    for r in found:
        heights[bar_of[r["kind"]]][r["staleness"] - xs[0]] += r["n"]
    drops = iter(drop_colours(sum(bar != "trained" for bar in bars)))
    fig, (ax,) = _figure(WIDE)
    bottom = np.zeros(len(xs))
    for bar in bars:
        colour = TRAINED_COLOUR if bar == "trained" else next(drops)
        ax.bar(xs, heights[bar], bottom=bottom, width=0.85, color=colour, label=bar)
        bottom += heights[bar]
    for b in bounds:
        ax.axvline(b + 0.5, color="black", ls="--", lw=1.5, label=f"bound max_staleness = {b}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness (learner version − oldest policy version of the sample)")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(bottom.max(), 1) * 1.12)  # headroom above the tallest bar
    _legend(fig, ax)
    title = f"Staleness of online samples ({scope(run)})"
    if replayed:
        rows_word = "row" if replayed == 1 else "rows"
        title += f"\n{replayed} replay {rows_word} not shown: replay is bounded by importance truncation"
    ax.set_title(title)
    return fig


_BIN_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 240, 480, 1440)


def _bin_minutes(span_s: float, events: int, max_bins: int = 60, per_bin: float = 4.0) -> int:
    """A round bin width (minutes): at most ``max_bins`` bins, and about ``per_bin`` events in each
    (unless that leaves fewer than 8 bins), so a slow rate does not read as a comb of 0s and 1s."""
    for width in _BIN_MINUTES:
        bins = max(1, math.ceil(span_s / 60 / width))
        if bins <= max_bins and (events / bins >= per_bin or bins <= 8):
            return width
    return max(1, math.ceil(span_s / 60 / max_bins))


def _rate_panel(
    ax: Axes, data: list[dict[str, Any]], starts: dict[str, float], names: Series, what: str
) -> None:
    """One throughput panel: events per minute per run, binned by minutes since the run's start."""
    if not data:
        ax.set_title(f"{what}: no data", fontsize=11)
        return
    span = max(r["t"] - starts[r["run"]] for r in data)
    width = _bin_minutes(span, len(data))
    edges = np.arange(0, span / 60 + width, width, dtype=float)
    if len(edges) < 2:
        edges = np.array([0.0, float(width)])
    for name in sorted(starts):
        minutes = np.array([(r["t"] - starts[name]) / 60 for r in data if r["run"] == name])
        if len(minutes):
            counts, _ = np.histogram(minutes, bins=edges)
            ax.stairs(
                counts / width, edges, lw=2, color=names.colours[name], ls=names.run_styles[name], label=name
            )
    ax.set_ylim(bottom=0)
    ax.set_title(f"{what} per minute ({width}-min bins)", fontsize=11)


def plot_throughput(lake: Path, run: str | None) -> Figure:
    """Trajectories and learner steps per minute against minutes since each run's first record."""
    done = "coalesce(nullif(finished_at, 0), scored_at)"
    trajs = rows(
        lake, f"SELECT run, {done} AS t FROM trajectories {where(run, f'{done} > 0', f'isfinite({done})')}"
    )
    steps = rows(lake, f"SELECT run, time AS t FROM train_steps {where(run, 'time > 0', 'isfinite(time)')}")
    if not trajs and not steps:
        raise NoData("no timestamps in trajectories or train_steps")
    starts: dict[str, float] = {}
    for r in trajs + steps:
        starts[r["run"]] = min(starts.get(r["run"], math.inf), r["t"])
    names = Series([(name, "") for name in starts])
    fig, (top, bottom) = _figure(TALL, rows=2)
    _rate_panel(top, trajs, starts, names, "Scored trajectories")
    _rate_panel(bottom, steps, starts, names, "Learner steps")
    top.set_ylabel("trajectories / min")
    bottom.set_ylabel("learner steps / min")
    bottom.set_xlabel("minutes since the run's first record")
    fig.suptitle(f"Throughput over wall time ({scope(run)})")
    if names.multi_run:
        _legend(fig, top if trajs else bottom, "run")
    return fig


def plot_loss(lake: Path, run: str | None) -> Figure:
    """Mean loss and mean importance ratio per optimiser step, one line per run."""
    found = rows(
        lake,
        f"SELECT run, step, loss, mean_ratio FROM train_steps {where(run, 'step IS NOT NULL')} ORDER BY ALL",
    )
    if not found:
        raise NoData("no train_steps rows")
    names = Series([(r["run"], "") for r in found])
    fig, (loss_ax, ratio_ax) = _figure(TALL, rows=2)
    for name in sorted(names.colours):
        mine = [r for r in found if r["run"] == name]
        style = {**names.style((name, ""), len(mine)), "lw": 1.5, "ms": 3}
        steps = [r["step"] for r in mine]
        loss_ax.plot(steps, np.array([r["loss"] for r in mine], dtype=float), **style)  # None -> NaN
        ratio_ax.plot(steps, np.array([r["mean_ratio"] for r in mine], dtype=float), **style)
    ratio_ax.axhline(1.0, color="black", ls=":", lw=1, label="ratio = 1 (on-policy)")
    loss_ax.set_ylabel("mean loss")
    loss_ax.set_title("Loss", fontsize=11)
    ratio_ax.set_ylabel("mean importance ratio π/μ")
    ratio_ax.set_title("Importance ratio (behaviour → current policy)", fontsize=11)
    ratio_ax.set_xlabel("optimiser step")
    ratio_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Learner loss and importance ratio by step ({scope(run)})")
    _legend(fig, ratio_ax, "run" if names.multi_run else None)
    return fig


PLOTTERS: dict[str, Callable[[Path, str | None], Figure]] = dict(
    zip(
        PLOTS,
        (plot_success_by_version, plot_reward_by_version, plot_staleness, plot_throughput, plot_loss),
        strict=True,
    )
)
