"""``rollstream report``: PNG plots and a text summary of one run (or every run) in the lake.

Everything comes from the deduplicating views of ``consumers.lake``. A plot whose data is missing
is skipped and named in the summary; an empty lake gives a summary that says so and no PNG. The
plots use matplotlib's object API (``Figure`` on the Agg canvas): no pyplot state, no display.
Everything here blocks; async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from consumers.lake import query

DPI = 110
WIDE = (9.0, 5.0)  # inches: 990 x 550 px at DPI
TALL = (9.0, 6.5)  # two stacked panels
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
EDGE_VERSIONS = 3  # "first and last N versions" in the summary
ONLINE = "source = 'online'"
PLOTS = ("success_by_version.png", "reward_by_version.png", "staleness.png", "throughput.png", "loss.png")


@dataclass(frozen=True)
class ReportResult:
    """What ``write_report`` made: the PNGs written, the plots skipped (and why), the summary."""

    plots: list[Path]
    summary: str
    summary_path: Path
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why it was not drawn


class _NoData(Exception):
    """A plot has nothing to draw; the message says what is missing."""


# --- data --------------------------------------------------------------------------------------


def _where(run: str | None, *conditions: str) -> str:
    """A WHERE clause restricting to ``run`` (when given) and ``conditions``."""
    parts = list(conditions)
    if run is not None:
        parts.append("run = '" + run.replace("'", "''") + "'")
    return ("WHERE " + " AND ".join(parts)) if parts else ""


def _rows(lake: Path, sql: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = query(lake, sql).to_pylist()
    return rows


def _one(lake: Path, sql: str) -> dict[str, Any]:
    rows = _rows(lake, sql)
    return rows[0] if rows else {}


SOURCE_STYLES = {"online": ("-", "o"), "expert": ("--", "s"), "replay": (":", "D"), "proxy": ("-.", "^")}
RUN_STYLES = ("-", "--", "-.", ":")  # so two runs with identical data stay distinguishable


class _Series:
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


TARGET_PER_BIN = 40  # valid trajectories the median version bin of a run should hold
MIN_BINS = 6  # never pool a run into fewer bins than this: a short run keeps one point per version
Z95 = 1.959964  # normal quantile of a two-sided 95 % interval


@dataclass(frozen=True)
class VersionBin:
    """The valid trajectories of policy versions ``lo``..``hi`` pooled into one plotted point."""

    lo: int
    hi: int
    version: float  # where the point is drawn: the count-weighted mean version of the bin
    n: int
    mean: float  # mean reward, the success rate for 0/1 rewards
    std: float  # sample standard deviation of the rewards (0 for a single trajectory)
    low: float  # 95 % Wilson interval of the success rate
    high: float


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n``: unlike p ± z·se it stays inside
    [0, 1] and does not collapse to a point at 0 % or 100 % when ``n`` is small."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def version_bins(
    versions: np.ndarray, counts: np.ndarray, *, target: int = TARGET_PER_BIN, min_bins: int = MIN_BINS
) -> tuple[int, list[tuple[int, int]]]:
    """Bin width and bins (inclusive version ranges) for one run, from its valid trajectories per version.

    The width is the smallest whose median non-empty bin holds ``target`` trajectories, but never
    so wide that fewer than ``min_bins`` bins remain (a short run keeps one point per version). A
    last bin with fewer than ``target / 2`` trajectories joins the one before it, so the end of
    training, where a reader looks first, does not rest on a handful of samples.
    """
    v, c = np.asarray(versions, dtype=int), np.asarray(counts, dtype=float)
    first, last = int(v.min()), int(v.max())
    widest = max(1, (last - first + 1) // min_bins)
    width = next(
        (w for w in range(1, widest + 1) if _median_bin(v - first, c, w) >= target),
        widest,
    )
    per_bin = np.bincount((v - first) // width, weights=c)
    ranges = [(first + i * width, min(first + (i + 1) * width - 1, last)) for i in range(len(per_bin))]
    if width > 1 and len(ranges) > 1 and per_bin[-1] < target / 2:
        ranges[-2:] = [(ranges[-2][0], last)]
    return width, ranges


def _median_bin(offsets: np.ndarray, counts: np.ndarray, width: int) -> float:
    per_bin = np.bincount(offsets // width, weights=counts)
    return float(np.median(per_bin[per_bin > 0]))


def pool_versions(
    ranges: list[tuple[int, int]], versions: np.ndarray, n: np.ndarray, sums: np.ndarray, squares: np.ndarray
) -> list[VersionBin]:
    """Per-version reward sums (count, Σr, Σr²) pooled into ``ranges``; empty ranges are left out."""
    bins = []
    for lo, hi in ranges:
        inside = (versions >= lo) & (versions <= hi)
        count = int(n[inside].sum())
        if count == 0:
            continue
        total = float(sums[inside].sum())
        mean = total / count
        var = (float(squares[inside].sum()) - total * mean) / (count - 1) if count > 1 else 0.0
        low, high = wilson_interval(total, count)
        at = float((versions[inside] * n[inside]).sum() / count)
        bins.append(VersionBin(lo, hi, at, count, mean, math.sqrt(max(var, 0.0)), low, high))
    return bins


@dataclass(frozen=True)
class PooledVersions:
    """A lake's valid trajectories pooled by version bins: per run/source series and per run."""

    series: dict[tuple[str, str], list[VersionBin]]
    runs: dict[str, list[VersionBin]]  # all sources of the run together (the count bars)
    widths: dict[str, int]  # versions per bin, per run

    def note(self) -> str:
        """The bin width for an axis label when every run with several versions shares it."""
        widths = {self.widths[r] for r, bins in self.runs.items() if bins[-1].hi > bins[0].lo}
        if len(widths) != 1 or widths == {1}:
            return ""
        return f", bins of {widths.pop()} versions"

    def label(self, names: _Series, key: tuple[str, str]) -> str:
        width = self.widths[key[0]]
        return names.label(key) + (f" (bins of {width})" if not self.note() and width > 1 else "")


def _version_sums(lake: Path, run: str | None, *keys: str) -> dict[tuple[str, ...], list[np.ndarray]]:
    """Per ``keys`` group: versions and, per version, the count, Σ reward and Σ reward² of valid
    trajectories (what ``pool_versions`` needs)."""
    rows = _rows(
        lake,
        f"SELECT {', '.join(keys)}, policy_version AS version, count(*) AS n, sum(reward) AS total, "
        f"sum(reward * reward) AS squares FROM trajectories {_where(run, 'valid')} "
        "GROUP BY ALL ORDER BY ALL",
    )
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row)
    cols = ("version", "n", "total", "squares")
    return {k: [np.array([r[c] for r in rs], dtype=float) for c in cols] for k, rs in grouped.items()}


def pooled_versions(lake: Path, run: str | None) -> PooledVersions:
    """Bins chosen per run (all its sources together), then applied to each of its series."""
    series = _version_sums(lake, run, "run", "source")
    pooled = PooledVersions({}, {}, {})
    for (name,), sums in _version_sums(lake, run, "run").items():
        pooled.widths[name], ranges = version_bins(sums[0], sums[1])
        pooled.runs[name] = pool_versions(ranges, *sums)
        for key, mine in series.items():
            if key[0] == name:
                pooled.series[(name, key[1])] = pool_versions(ranges, *mine)
    return pooled


def _column(bins: list[VersionBin], name: str) -> np.ndarray:
    return np.array([getattr(b, name) for b in bins], dtype=float)


# --- plots -------------------------------------------------------------------------------------


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


def _scope(run: str | None) -> str:
    return f"run {run}" if run is not None else "all runs"


def plot_success_by_version(lake: Path, run: str | None) -> Figure:
    """Success rate by policy version, one line per run/source with a 95 % Wilson band.

    Consecutive versions are pooled (``version_bins``) so that each point rests on enough
    trajectories to show a trend; the light bars count the trajectories of each bin per run.
    """
    pooled = pooled_versions(lake, run)
    if not pooled.series:
        raise _NoData("no valid trajectories")
    names = _Series(list(pooled.series))
    fig, (ax,) = _figure(WIDE)
    counts = ax.twinx()
    share = 0.9 / len(pooled.runs)
    for i, (name, bins) in enumerate(sorted(pooled.runs.items())):
        lo, hi = _column(bins, "lo"), _column(bins, "hi")
        spans = (hi - lo + 1) * share  # runs side by side inside each bin
        centres = (lo + hi) / 2 + (i - (len(pooled.runs) - 1) / 2) * spans
        counts.bar(centres, _column(bins, "n"), width=spans, color=names.colours[name], alpha=0.15)
    for key, bins in sorted(pooled.series.items()):
        x, y = _column(bins, "version"), _column(bins, "mean")
        low, high = _column(bins, "low"), _column(bins, "high")
        style = {**names.style(key, len(bins)), "label": pooled.label(names, key)}
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
    ax.set_title(f"Success rate by policy version ({_scope(run)})")
    _legend(fig, ax, "run · source" if names.multi_run and names.multi_source else None)
    return fig


def plot_reward_by_version(lake: Path, run: str | None) -> Figure:
    """Mean reward ± one standard deviation by policy version, pooled as in the success plot."""
    pooled = pooled_versions(lake, run)
    if not pooled.series:
        raise _NoData("no valid trajectories")
    names = _Series(list(pooled.series))
    fig, (ax,) = _figure(WIDE)
    step = 0.6 / len(pooled.series)
    for i, (key, bins) in enumerate(sorted(pooled.series.items())):
        # side by side within a bin, so error bars do not hide each other
        offset = (i - (len(pooled.series) - 1) / 2) * step * pooled.widths[key[0]]
        ax.errorbar(
            _column(bins, "version") + offset,
            _column(bins, "mean"),
            yerr=_column(bins, "std"),
            capsize=3,
            elinewidth=1.2,
            **{**names.style(key, len(bins)), "label": pooled.label(names, key)},
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"policy version (oldest weights in the trajectory){pooled.note()}")
    ax.set_ylabel("reward of valid trajectories (mean ± 1 std)")
    ax.set_title(f"Reward by policy version ({_scope(run)})")
    _legend(fig, ax, "run · source" if names.multi_run and names.multi_source else None)
    return fig


def plot_staleness(lake: Path, run: str | None) -> Figure:
    """Staleness of online samples, trained vs dropped (by reason) stacked, with the bound marked."""
    rows = _rows(
        lake,
        "SELECT staleness, CASE WHEN fate = 'trained' THEN 'trained' ELSE 'dropped: ' || "
        "coalesce(nullif(reason, ''), 'unknown') END AS kind, count(*) AS n FROM train_log "
        f"{_where(run, ONLINE)} GROUP BY ALL ORDER BY ALL",
    )
    if not rows:
        raise _NoData("no online train_log rows")
    bounds = [
        r["b"]
        for r in _rows(
            lake, f"SELECT DISTINCT max_staleness AS b FROM train_log {_where(run, ONLINE)} ORDER BY 1"
        )
    ]
    not_online = _where(run, f"NOT {ONLINE}")
    replayed = _one(lake, f"SELECT count(*) AS n FROM train_log {not_online}")["n"]
    lo, hi = min(r["staleness"] for r in rows), max(r["staleness"] for r in rows)
    xs = np.arange(min(lo, 0), max(hi, *bounds) + 1)
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (k != "trained", k))
    fig, (ax,) = _figure(WIDE)
    bottom = np.zeros(len(xs))
    drop_colours = iter(["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#e377c2"] * 4)
    for kind in kinds:
        heights = np.zeros(len(xs))
        for r in rows:
            if r["kind"] == kind:
                heights[r["staleness"] - xs[0]] += r["n"]
        colour = "#2ca02c" if kind == "trained" else next(drop_colours)
        ax.bar(xs, heights, bottom=bottom, width=0.85, color=colour, label=kind)
        bottom += heights
    for b in bounds:
        ax.axvline(b + 0.5, color="black", ls="--", lw=1.5, label=f"bound max_staleness = {b}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness (learner version − oldest policy version of the sample)")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(bottom.max(), 1) * 1.12)  # headroom above the tallest bar
    _legend(fig, ax)
    title = f"Staleness of online samples ({_scope(run)})"
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
    ax: Axes, data: list[dict[str, Any]], starts: dict[str, float], names: _Series, what: str
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
    trajs = _rows(lake, f"SELECT run, {done} AS t FROM trajectories {_where(run, f'{done} > 0')}")
    steps = _rows(lake, f"SELECT run, time AS t FROM train_steps {_where(run, 'time > 0')}")
    if not trajs and not steps:
        raise _NoData("no timestamps in trajectories or train_steps")
    starts: dict[str, float] = {}
    for r in trajs + steps:
        starts[r["run"]] = min(starts.get(r["run"], math.inf), r["t"])
    names = _Series([(name, "") for name in starts])
    fig, (top, bottom) = _figure(TALL, rows=2)
    _rate_panel(top, trajs, starts, names, "Scored trajectories")
    _rate_panel(bottom, steps, starts, names, "Learner steps")
    top.set_ylabel("trajectories / min")
    bottom.set_ylabel("learner steps / min")
    bottom.set_xlabel("minutes since the run's first record")
    fig.suptitle(f"Throughput over wall time ({_scope(run)})")
    if names.multi_run:
        _legend(fig, top if trajs else bottom, "run")
    return fig


def plot_loss(lake: Path, run: str | None) -> Figure:
    """Mean loss and mean importance ratio per optimiser step, one line per run."""
    rows = _rows(lake, f"SELECT run, step, loss, mean_ratio FROM train_steps {_where(run)} ORDER BY ALL")
    if not rows:
        raise _NoData("no train_steps rows")
    names = _Series([(r["run"], "") for r in rows])
    fig, (loss_ax, ratio_ax) = _figure(TALL, rows=2)
    for name in sorted(names.colours):
        mine = [r for r in rows if r["run"] == name]
        style = {**names.style((name, ""), len(mine)), "lw": 1.5, "ms": 3}
        loss_ax.plot([r["step"] for r in mine], [r["loss"] for r in mine], **style)
        ratio_ax.plot([r["step"] for r in mine], [r["mean_ratio"] for r in mine], **style)
    ratio_ax.axhline(1.0, color="black", ls=":", lw=1, label="ratio = 1 (on-policy)")
    loss_ax.set_ylabel("mean loss")
    loss_ax.set_title("Loss", fontsize=11)
    ratio_ax.set_ylabel("mean importance ratio π/μ")
    ratio_ax.set_title("Importance ratio (behaviour → current policy)", fontsize=11)
    ratio_ax.set_xlabel("optimiser step")
    ratio_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Learner loss and importance ratio by step ({_scope(run)})")
    _legend(fig, ratio_ax, "run" if names.multi_run else None)
    return fig


PLOTTERS: dict[str, Callable[[Path, str | None], Figure]] = dict(
    zip(
        PLOTS,
        (plot_success_by_version, plot_reward_by_version, plot_staleness, plot_throughput, plot_loss),
        strict=True,
    )
)


# --- summary -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _span(lo: int | None, hi: int | None) -> str:
    return "" if lo is None else (f" ({lo})" if lo == hi else f" ({lo}–{hi})")


def _counts(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r[key] or '-'} {r['n']:,}" for r in rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _record_count(lake: Path, run: str | None) -> int:
    tables = ("trajectories", "chunks", "train_log", "train_steps", "tasks")
    sql = " UNION ALL ".join(f"SELECT count(*) AS n FROM {t} {_where(run)}" for t in tables)
    return int(sum(r["n"] for r in _rows(lake, sql)))


def _trajectory_lines(lake: Path, run: str | None) -> list[str]:
    w = _where(run)
    head = _one(
        lake,
        "SELECT count(*) AS n, count(*) FILTER (valid) AS valid, min(policy_version) AS lo, "
        f"max(policy_version) AS hi, count(DISTINCT policy_version) AS versions FROM trajectories {w}",
    )
    if not head["n"]:
        return ["trajectories  none"]
    invalid = _rows(
        lake,
        f"SELECT invalid_reason, count(*) AS n FROM trajectories {_where(run, 'NOT valid')} "
        "GROUP BY 1 ORDER BY n DESC, 1",
    )
    sources = _rows(lake, f"SELECT source, count(*) AS n FROM trajectories {w} GROUP BY 1 ORDER BY n DESC, 1")
    lines = [
        f"trajectories  {head['n']:,} (valid {head['valid']:,}, invalid {head['n'] - head['valid']:,}"
        + (f": {_counts(invalid, 'invalid_reason')})" if invalid else ")")
    ]
    if len(sources) > 1:
        lines.append(f"sources       {_counts(sources, 'source')}")
    lines.append(f"versions      {head['versions']} seen ({head['lo']}–{head['hi']})")
    lines += _success_lines(lake, run)
    return lines


def _success_lines(lake: Path, run: str | None) -> list[str]:
    """Success overall and over each run's first and last ``EDGE_VERSIONS`` policy versions."""
    n = EDGE_VERSIONS
    rows = _rows(
        lake,
        f"""
        WITH ranked AS (
            SELECT run, source, policy_version AS v, reward,
                   dense_rank() OVER (PARTITION BY run ORDER BY policy_version) AS up,
                   dense_rank() OVER (PARTITION BY run ORDER BY policy_version DESC) AS down
            FROM trajectories {_where(run, "valid")})
        SELECT run, avg(reward) AS overall,
               avg(reward) FILTER (up <= {n}) AS first, min(v) FILTER (up <= {n}) AS first_lo,
               max(v) FILTER (up <= {n}) AS first_hi,
               avg(reward) FILTER (down <= {n}) AS last, min(v) FILTER (down <= {n}) AS last_lo,
               max(v) FILTER (down <= {n}) AS last_hi
        FROM ranked GROUP BY run ORDER BY run""",
    )
    if not rows:
        return ["success       n/a (no valid trajectories)"]
    width = max(len(r["run"]) for r in rows) if len(rows) > 1 else 0
    lines = []
    for i, r in enumerate(rows):
        prefix = ("success       " if i == 0 else " " * 14) + (f"{r['run']:<{width}}  " if width else "")
        lines.append(
            f"{prefix}{_pct(r['overall'])} overall; first {n} versions"
            f"{_span(r['first_lo'], r['first_hi'])} {_pct(r['first'])}; last {n} versions"
            f"{_span(r['last_lo'], r['last_hi'])} {_pct(r['last'])}"
        )
    by_source = _rows(
        lake,
        f"SELECT run, source, avg(reward) AS s FROM trajectories {_where(run, 'valid')} "
        "GROUP BY ALL ORDER BY ALL",
    )
    if len({r["source"] for r in by_source}) > 1:
        parts = [f"{r['run'] + ' · ' if width else ''}{r['source']} {_pct(r['s'])}" for r in by_source]
        lines.append(" " * 14 + "by source: " + ", ".join(parts))
    return lines


def _training_lines(lake: Path, run: str | None) -> list[str]:
    w = _where(run)
    fates = _rows(
        lake,
        f"SELECT fate, coalesce(nullif(reason, ''), '-') AS reason, count(*) AS n "
        f"FROM train_log {w} GROUP BY ALL ORDER BY n DESC, reason",
    )
    if not fates:
        lines = ["train_log     none"]
    else:
        trained = sum(r["n"] for r in fates if r["fate"] == "trained")
        dropped = [r for r in fates if r["fate"] != "trained"]
        reasons = f" ({_counts(dropped, 'reason')})" if dropped else ""
        trained_elsewhere = _where(run, "fate = 'trained'", f"NOT {ONLINE}")
        replayed = _one(lake, f"SELECT count(*) AS n FROM train_log {trained_elsewhere}")
        not_online = f" ({replayed['n']:,} not online)" if replayed["n"] else ""
        lines = [
            f"train_log     trained {trained:,}{not_online}, "
            f"dropped {sum(r['n'] for r in dropped):,}{reasons}"
        ]
        audit = _one(
            lake,
            f"""
            SELECT count(*) FILTER (fate = 'trained' AND staleness > max_staleness) AS violations,
                   max(staleness) FILTER (fate = 'trained') AS worst,
                   min(max_staleness) AS bound_lo, max(max_staleness) AS bound_hi
            FROM train_log {_where(run, ONLINE)}""",
        )
        if audit["bound_hi"] is None:
            lines.append("staleness     no online samples")
        else:
            bound = _span(audit["bound_lo"], audit["bound_hi"]).strip(" ()")
            verdict = "OK" if audit["violations"] == 0 else "VIOLATED"
            lines.append(
                f"staleness     max trained (online) {audit['worst'] if audit['worst'] is not None else '-'}"
                f", bound {bound}; audit: {audit['violations']:,} online samples trained past "
                f"the bound — {verdict}"
            )
    steps = _rows(
        lake,
        "SELECT run, count(*) AS n, min(step) AS lo, max(step) AS hi, max(version) AS version "
        f"FROM train_steps {w} GROUP BY run ORDER BY run",
    )
    parts = [
        f"{r['run'] + ' ' if len(steps) > 1 else ''}{r['n']:,} (steps {r['lo']}–{r['hi']}, "
        f"policy version {r['version']})"
        for r in steps
    ]
    lines.append(f"steps         {'; '.join(parts) or 'none'}")
    return lines


def _wall_time_line(lake: Path, run: str | None) -> str:
    w = _where(run)
    span = _one(
        lake,
        f"""
        SELECT min(t) AS lo, max(t) AS hi FROM (
            SELECT started_at AS t FROM trajectories {w} UNION ALL SELECT finished_at FROM trajectories {w}
            UNION ALL SELECT scored_at FROM trajectories {w} UNION ALL SELECT time FROM train_log {w}
            UNION ALL SELECT time FROM train_steps {w} UNION ALL SELECT created_at FROM tasks {w}
        ) WHERE t > 0""",
    )
    if span.get("lo") is None:
        return "wall time     unknown (no timestamps)"
    return f"wall time     {_utc(span['lo'])} → {_utc(span['hi'])} UTC ({_duration(span['hi'] - span['lo'])})"


def summarize(lake: Path, run: str | None = None) -> list[str]:
    """The summary's lines (without the plot list); an empty lake (or run) says so in one line."""
    header = f"rollstream report — lake {lake} ({_scope(run)})"
    if _record_count(lake, run) == 0:
        if run is None:
            return [header, "the lake has no records yet: nothing to report"]
        runs = [
            r["run"]
            for r in _rows(
                lake,
                "SELECT DISTINCT run FROM trajectories UNION SELECT DISTINCT run FROM train_log ORDER BY 1",
            )
        ]
        known = f"runs in the lake: {', '.join(runs)}" if runs else "the lake has no records at all"
        return [header, f"no records for run {run!r}: nothing to report ({known})"]
    runs = [
        r["run"]
        for r in _rows(
            lake,
            f"SELECT DISTINCT run FROM trajectories {_where(run)} "
            f"UNION SELECT DISTINCT run FROM train_log {_where(run)} ORDER BY 1",
        )
    ]
    lines = [header]
    if run is None and len(runs) > 1:
        lines.append(f"runs          {', '.join(runs)}")
    return lines + _trajectory_lines(lake, run) + _training_lines(lake, run) + [_wall_time_line(lake, run)]


# --- entry points ------------------------------------------------------------------------------


def write_report(lake_root: Path, out_dir: Path, *, run: str | None = None) -> ReportResult:
    """Write the plots that have data and ``summary.txt`` into ``out_dir``.

    An earlier report's PNG of a plot skipped this time is removed, so the directory never mixes
    two reports. An empty lake (or an unknown ``run``) gives a summary that says so and no PNG.
    """
    lake_root, out_dir = Path(lake_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = summarize(lake_root, run)
    empty = len(lines) == 2 and "nothing to report" in lines[1]
    plots: list[Path] = []
    skipped: dict[str, str] = {}
    for name, plot in PLOTTERS.items():
        path = out_dir / name
        path.unlink(missing_ok=True)
        if empty:
            skipped[name] = "no records"
            continue
        try:
            fig = plot(lake_root, run)
        except _NoData as exc:
            skipped[name] = str(exc)
            continue
        fig.savefig(path, dpi=DPI)
        plots.append(path)
    if empty:
        lines.append("plots         none drawn (no data)")
    else:
        lines.append(f"plots         {len(plots)} written to {out_dir}")
        lines += [f"skipped       {name}: {why}" for name, why in skipped.items()]
    summary = "\n".join(lines) + "\n"
    summary_path = out_dir / "summary.txt"
    summary_path.write_text(summary, encoding="utf-8")
    return ReportResult(plots=plots, summary=summary, summary_path=summary_path, skipped=skipped)


def report_command(lake: Path, out: Path, run: str | None) -> None:
    """``rollstream report``: write the report, print its summary and the files it wrote."""
    console = Console()
    result = write_report(lake, out, run=run)
    console.print(Panel(Text(result.summary.rstrip()), title="rollstream report", expand=False))
    for path in [*result.plots, result.summary_path]:
        console.print(Text(f"wrote {path}"))
