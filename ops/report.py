"""``rollstream report``: PNG plots and a text summary of one run (or every run) in the lake.

Everything comes from the deduplicating views of ``ops.lake_query``. A plot whose data is missing
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

from ops.lake_query import query

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


def _version_stats(lake: Path, run: str | None) -> list[dict[str, Any]]:
    return _rows(
        lake,
        "SELECT run, source, policy_version AS version, count(*) AS n, avg(reward) AS mean, "
        "coalesce(stddev_samp(reward), 0) AS std FROM trajectories "
        f"{_where(run, 'valid')} GROUP BY ALL ORDER BY run, source, version",
    )


def _by_series(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["run"], row["source"]), []).append(row)
    return {
        key: {col: np.array([r[col] for r in rs], dtype=float) for col in ("version", "n", "mean", "std")}
        for key, rs in grouped.items()
    }


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
    """Success rate per policy version, one line per run/source, trajectories per run as light bars."""
    series = _by_series(_version_stats(lake, run))
    if not series:
        raise _NoData("no valid trajectories")
    names = _Series(list(series))
    fig, (ax,) = _figure(WIDE)
    counts = ax.twinx()
    per_run: dict[str, dict[float, float]] = {}
    for (name, _), s in series.items():
        for v, n in zip(s["version"], s["n"], strict=True):
            per_run.setdefault(name, {})[v] = per_run.get(name, {}).get(v, 0.0) + n
    width = 0.8 / len(per_run)
    for i, (name, by_version) in enumerate(sorted(per_run.items())):
        offset = (i - (len(per_run) - 1) / 2) * width
        versions = np.array(sorted(by_version))
        counts.bar(
            versions + offset,
            [by_version[v] for v in versions],
            width=width,
            color=names.colours[name],
            alpha=0.15,
        )
    for key, s in sorted(series.items()):
        ax.plot(s["version"], s["mean"], **names.style(key, len(s["version"])))
    ax.set_zorder(counts.get_zorder() + 1)  # lines above the bars
    ax.patch.set_visible(False)
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("policy version (oldest weights in the trajectory)")
    ax.set_ylabel("success rate (mean reward of valid trajectories)")
    counts.set_ylabel("valid trajectories per version (light bars)", color="#555555")
    counts.set_ylim(0, max(max(v.values()) for v in per_run.values()) * 2.5)  # bars in the lower part
    counts.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Success rate by policy version ({_scope(run)})")
    _legend(fig, ax, "run · source" if names.multi_run and names.multi_source else None)
    return fig


def plot_reward_by_version(lake: Path, run: str | None) -> Figure:
    """Mean reward ± one standard deviation per policy version, one line per run/source."""
    series = _by_series(_version_stats(lake, run))
    if not series:
        raise _NoData("no valid trajectories")
    names = _Series(list(series))
    fig, (ax,) = _figure(WIDE)
    step = 0.6 / max(len(series), 1)
    for i, (key, s) in enumerate(sorted(series.items())):
        offset = (i - (len(series) - 1) / 2) * step  # side by side, so error bars do not hide each other
        ax.errorbar(
            s["version"] + offset,
            s["mean"],
            yerr=s["std"],
            capsize=3,
            elinewidth=1.2,
            **names.style(key, len(s["version"])),
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("policy version (oldest weights in the trajectory)")
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
