"""The report's data: SQL over the lake's views, and policy versions pooled into bins."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from consumers.lake import query

ONLINE = "source = 'online'"


class NoData(Exception):
    """A plot has nothing to draw; the message says what is missing."""


def scope(run: str | None) -> str:
    """How the report names what it covers."""
    return f"run {run}" if run is not None else "all runs"


def where(run: str | None, *conditions: str) -> str:
    """A WHERE clause restricting to ``run`` (when given) and ``conditions``."""
    parts = list(conditions)
    if run is not None:
        parts.append("run = '" + run.replace("'", "''") + "'")
    return ("WHERE " + " AND ".join(parts)) if parts else ""


def rows(lake: Path, sql: str) -> list[dict[str, Any]]:
    """The rows of ``sql`` over the lake's views."""
    found: list[dict[str, Any]] = query(lake, sql).to_pylist()
    return found


def one(lake: Path, sql: str) -> dict[str, Any]:
    """The first row of ``sql`` (empty when there is none)."""
    found = rows(lake, sql)
    return found[0] if found else {}


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

    def width_note(self, run: str) -> str:
        """`` (bins of N)`` for a series label, when the axis label cannot say it for every run."""
        width = self.widths[run]
        return f" (bins of {width})" if not self.note() and width > 1 else ""


# Rows a version plot can use: a version, and a finite reward (rows of other writers may lack them).
PLOTTABLE = ("valid", "policy_version IS NOT NULL", "isfinite(reward)")
_KEYS = {"run": "run", "source": "coalesce(source, 'unknown') AS source"}


def _version_sums(lake: Path, run: str | None, *keys: str) -> dict[tuple[str, ...], list[np.ndarray]]:
    """Per ``keys`` group: versions and, per version, the count, Σ reward and Σ reward² of valid
    trajectories (what ``pool_versions`` needs)."""
    found = rows(
        lake,
        f"SELECT {', '.join(_KEYS[k] for k in keys)}, policy_version AS version, count(*) AS n, "
        f"sum(reward) AS total, sum(reward * reward) AS squares FROM trajectories "
        f"{where(run, *PLOTTABLE)} GROUP BY ALL ORDER BY ALL",
    )
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in found:
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


def column(bins: list[VersionBin], name: str) -> np.ndarray:
    """One field of every bin, as a float array."""
    return np.array([getattr(b, name) for b in bins], dtype=float)
