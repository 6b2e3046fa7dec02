"""``rollstream report``: PNG plots and a text summary of one run (or every run) in the lake.

Everything comes from the deduplicating views of ``consumers.lake``. A plot whose data is missing
is skipped and named in the summary; an empty lake gives a summary that says so and no PNG.
Modules: ``data`` (SQL and version bins), ``plots`` (matplotlib's object API on the Agg canvas:
no pyplot state, no display), ``evals`` (pass@k by version from ``rollstream eval``, next to the
training success), ``summary`` (the text). Everything here blocks; async callers go
through ``anyio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from matplotlib.figure import Figure
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from consumers.lake import LakeError
from ops.report import plots as _plots
from ops.report.data import (
    NoData,
    PooledVersions,
    VersionBin,
    pool_versions,
    pooled_versions,
    version_bins,
    wilson_interval,
)
from ops.report.evals import EVAL_PLOT, eval_lines, eval_points, plot_eval_by_version
from ops.report.plots import (
    DPI,
    plot_loss,
    plot_reward_by_version,
    plot_staleness,
    plot_success_by_version,
    plot_throughput,
)
from ops.report.summary import summarize

PLOTS = (*_plots.PLOTS, EVAL_PLOT)
PLOTTERS = {**_plots.PLOTTERS, EVAL_PLOT: plot_eval_by_version}

__all__ = [
    "PLOTS",
    "PooledVersions",
    "ReportResult",
    "VersionBin",
    "eval_points",
    "plot_eval_by_version",
    "plot_loss",
    "plot_reward_by_version",
    "plot_staleness",
    "plot_success_by_version",
    "plot_throughput",
    "pool_versions",
    "pooled_versions",
    "report_command",
    "summarize",
    "version_bins",
    "wilson_interval",
    "write_report",
]
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """What ``write_report`` made: the PNGs written, the plots skipped (and why), the summary."""

    plots: list[Path]
    summary: str
    summary_path: Path
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why it was not drawn


def _draw(plot: Callable[[Path, str | None], Figure], lake: Path, run: str | None, path: Path) -> str:
    """Draw one plot into ``path``; "" when drawn, else why not. A plot that fails on data it did
    not expect is skipped and named (and logged with its traceback): the others are still drawn."""
    try:
        plot(lake, run).savefig(path, dpi=DPI)
    except NoData as exc:
        return str(exc)
    except LakeError:
        raise
    except Exception as exc:
        log.exception("report_plot_failed", plot=path.name)
        path.unlink(missing_ok=True)
        return f"could not draw it ({type(exc).__name__}: {exc})"
    return ""


def write_report(lake_root: Path, out_dir: Path, *, run: str | None = None) -> ReportResult:
    """Write the plots that have data and ``summary.txt`` into ``out_dir``.

    An earlier report's PNG of a plot skipped this time is removed, so the directory never mixes
    two reports. An empty lake (or an unknown ``run``) gives a summary that says so and no PNG.
    """
    lake_root, out_dir = Path(lake_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = summarize(lake_root, run)
    empty = len(lines) == 2 and "nothing to report" in lines[1]
    lines += [] if empty else eval_lines(lake_root, run)
    plots: list[Path] = []
    skipped: dict[str, str] = {}
    for name, plot in PLOTTERS.items():
        path = out_dir / name
        path.unlink(missing_ok=True)
        if empty:
            skipped[name] = "no records"
            continue
        why = _draw(plot, lake_root, run, path)
        if why:
            skipped[name] = why
        else:
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
