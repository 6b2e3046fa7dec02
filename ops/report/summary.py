"""The report's text summary: trajectories, success over versions, the training account, the
staleness audit and the wall time, from the lake's views."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from consumers.lake import QueryError
from ops.report.data import ONLINE, one, rows, scope, where

EDGE_VERSIONS = 3  # "first and last N versions" in the summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _span(lo: int | None, hi: int | None) -> str:
    return "" if lo is None else (f" ({lo})" if lo == hi else f" ({lo}–{hi})")


def _counts(found: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r[key] or '-'} {r['n']:,}" for r in found)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _utc(ts: float) -> str:
    try:
        return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a timestamp no calendar holds
        return f"{ts:g} s"


def _record_count(lake: Path, run: str | None) -> int:
    tables = ("trajectories", "chunks", "train_log", "train_steps", "tasks")
    sql = " UNION ALL ".join(f"SELECT count(*) AS n FROM {t} {where(run)}" for t in tables)
    return int(sum(r["n"] for r in rows(lake, sql)))


def _trajectory_lines(lake: Path, run: str | None) -> list[str]:
    w = where(run)
    head = one(
        lake,
        "SELECT count(*) AS n, count(*) FILTER (valid) AS valid, min(policy_version) AS lo, "
        f"max(policy_version) AS hi, count(DISTINCT policy_version) AS versions FROM trajectories {w}",
    )
    if not head["n"]:
        return ["trajectories  none"]
    invalid = rows(
        lake,
        f"SELECT invalid_reason, count(*) AS n FROM trajectories {where(run, 'NOT valid')} "
        "GROUP BY 1 ORDER BY n DESC, 1",
    )
    sources = rows(lake, f"SELECT source, count(*) AS n FROM trajectories {w} GROUP BY 1 ORDER BY n DESC, 1")
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
    found = rows(
        lake,
        f"""
        WITH ranked AS (
            SELECT run, source, policy_version AS v, reward,
                   dense_rank() OVER (PARTITION BY run ORDER BY policy_version) AS up,
                   dense_rank() OVER (PARTITION BY run ORDER BY policy_version DESC) AS down
            FROM trajectories {where(run, "valid")})
        SELECT run, avg(reward) AS overall,
               avg(reward) FILTER (up <= {n}) AS first, min(v) FILTER (up <= {n}) AS first_lo,
               max(v) FILTER (up <= {n}) AS first_hi,
               avg(reward) FILTER (down <= {n}) AS last, min(v) FILTER (down <= {n}) AS last_lo,
               max(v) FILTER (down <= {n}) AS last_hi
        FROM ranked GROUP BY run ORDER BY run""",
    )
    if not found:
        return ["success       n/a (no valid trajectories)"]
    width = max(len(r["run"]) for r in found) if len(found) > 1 else 0
    lines = []
    for i, r in enumerate(found):
        prefix = ("success       " if i == 0 else " " * 14) + (f"{r['run']:<{width}}  " if width else "")
        lines.append(
            f"{prefix}{_pct(r['overall'])} overall; first {n} versions"
            f"{_span(r['first_lo'], r['first_hi'])} {_pct(r['first'])}; last {n} versions"
            f"{_span(r['last_lo'], r['last_hi'])} {_pct(r['last'])}"
        )
    by_source = rows(
        lake,
        f"SELECT run, source, avg(reward) AS s FROM trajectories {where(run, 'valid')} "
        "GROUP BY ALL ORDER BY ALL",
    )
    if len({r["source"] for r in by_source}) > 1:
        parts = [f"{r['run'] + ' · ' if width else ''}{r['source']} {_pct(r['s'])}" for r in by_source]
        lines.append(" " * 14 + "by source: " + ", ".join(parts))
    return lines


def _training_lines(lake: Path, run: str | None) -> list[str]:
    w = where(run)
    fates = rows(
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
        trained_elsewhere = where(run, "fate = 'trained'", f"NOT {ONLINE}")
        replayed = one(lake, f"SELECT count(*) AS n FROM train_log {trained_elsewhere}")
        not_online = f" ({replayed['n']:,} not online)" if replayed["n"] else ""
        lines = [
            f"train_log     trained {trained:,}{not_online}, "
            f"dropped {sum(r['n'] for r in dropped):,}{reasons}"
        ]
        audit = one(
            lake,
            f"""
            SELECT count(*) FILTER (fate = 'trained' AND staleness > max_staleness) AS violations,
                   max(staleness) FILTER (fate = 'trained') AS worst,
                   min(max_staleness) AS bound_lo, max(max_staleness) AS bound_hi
            FROM train_log {where(run, ONLINE)}""",
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
    steps = rows(
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
    lines.append(_waste_line(lake, run))
    return lines


def _waste_line(lake: Path, run: str | None) -> str:
    """Stale drops as a share of the online samples, and the learner's idle share of its loop."""
    online = one(
        lake,
        "SELECT count(*) AS n, count(*) FILTER (fate = 'dropped' AND reason = 'stale') AS stale "
        f"FROM train_log {where(run, ONLINE)}",
    )
    stale = f"{online['stale'] / online['n']:.1%}" if online["n"] else "-"
    try:
        idle = one(
            lake,
            "SELECT coalesce(sum(wait_s), 0) AS wait, coalesce(sum(busy_s), 0) AS busy "
            f"FROM train_steps {where(run, 'busy_s > 0')}",
        )
    except QueryError:  # a lake from before the steps were timed
        idle = {"wait": 0.0, "busy": 0.0}
    total = float(idle["wait"]) + float(idle["busy"])
    share = f"{idle['wait'] / total:.1%} of {_duration(total)}" if total else "not recorded"
    return (
        f"waste         stale drops {online['stale']:,} of {online['n']:,} online samples ({stale}); "
        f"learner idle {share}"
    )


def _wall_time_line(lake: Path, run: str | None) -> str:
    w = where(run)
    span = one(
        lake,
        f"""
        SELECT min(t) AS lo, max(t) AS hi FROM (
            SELECT started_at AS t FROM trajectories {w} UNION ALL SELECT finished_at FROM trajectories {w}
            UNION ALL SELECT scored_at FROM trajectories {w} UNION ALL SELECT time FROM train_log {w}
            UNION ALL SELECT time FROM train_steps {w} UNION ALL SELECT created_at FROM tasks {w}
        ) WHERE t > 0 AND isfinite(t)""",
    )
    if span.get("lo") is None:
        return "wall time     unknown (no timestamps)"
    return f"wall time     {_utc(span['lo'])} → {_utc(span['hi'])} UTC ({_duration(span['hi'] - span['lo'])})"


def summarize(lake: Path, run: str | None = None) -> list[str]:
    """The summary's lines (without the plot list); an empty lake (or run) says so in one line."""
    header = f"rollstream report — lake {lake} ({scope(run)})"
    if _record_count(lake, run) == 0:
        if run is None:
            return [header, "the lake has no records yet: nothing to report"]
        runs = [
            r["run"]
            for r in rows(
                lake,
                "SELECT DISTINCT run FROM trajectories UNION SELECT DISTINCT run FROM train_log ORDER BY 1",
            )
        ]
        known = f"runs in the lake: {', '.join(runs)}" if runs else "the lake has no records at all"
        return [header, f"no records for run {run!r}: nothing to report ({known})"]
    runs = [
        r["run"]
        for r in rows(
            lake,
            f"SELECT DISTINCT run FROM trajectories {where(run)} "
            f"UNION SELECT DISTINCT run FROM train_log {where(run)} ORDER BY 1",
        )
    ]
    lines = [header]
    if run is None and len(runs) > 1:
        lines.append(f"runs          {', '.join(runs)}")
    return lines + _trajectory_lines(lake, run) + _training_lines(lake, run) + [_wall_time_line(lake, run)]
