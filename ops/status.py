"""``rollstream status`` and ``rollstream scale``: ask the broker and the supervisor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from nats.aio.client import Client as NATS
from rich.console import Console
from rich.table import Table

from ops.config import Config
from streams import policy
from streams.bus import backlog
from streams.topology import CONSUMERS


async def _quiet(exc: Exception) -> None:
    """nats-py reports connection errors here; the caller turns them into one sentence."""


async def _connect(cfg: Config) -> NATS:
    """Connect as the ops role (with the deployment's credentials when it has them)."""
    from ops.worker import connect

    try:
        with anyio.fail_after(8):
            return await connect(
                cfg,
                "ops",
                connect_timeout=3,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                error_cb=_quiet,
            )
    except Exception:  # noqa: BLE001 - nats raises several kinds for "nobody there"
        raise ConnectionError(f"no broker answers at {cfg.nats_url}: is `just up` running?") from None


def restarts(cfg: Config) -> dict[str, int]:
    """How often the supervisor restarted each worker kind (``processes.json``)."""
    path = cfg.state / "processes.json"
    if not path.exists():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).get("restarts", {}).items()}


def problems(cfg: Config) -> list[str]:
    """The supervisor's view of errors workers keep hitting (``ops.health``), one line per kind."""
    from ops.health import describe, read_board

    return describe(read_board(cfg.state), restarts(cfg))


def processes(cfg: Config) -> dict[str, int]:
    path = cfg.state / "processes.json"
    if not path.exists():
        return {}
    counts: dict[str, int] = {}
    for w in json.loads(path.read_text()).get("workers", []):
        counts[w["name"]] = counts.get(w["name"], 0) + 1
    return counts


async def _status(cfg: Config, console: Console) -> None:
    nc = await _connect(cfg)
    try:
        js = nc.jetstream(timeout=5)
        latest = await policy.latest(js, cfg.run)
        procs = processes(cfg)
        t = Table(title=f"rollstream · run {cfg.run} · policy version {latest.version if latest else '-'}")
        for col in ("group", "processes", "pending", "ack pending", "redelivered"):
            t.add_column(col, justify="right" if col != "group" else "left")
        for spec in CONSUMERS:
            try:
                pending, ack_pending, redelivered = await backlog(js, spec, cfg.run)
            except Exception:  # noqa: BLE001 - consumer not created yet
                pending = ack_pending = redelivered = -1
            proc_name = spec.group.split("-")[0]
            t.add_row(
                spec.group, str(procs.get(proc_name, 0)), str(pending), str(ack_pending), str(redelivered)
            )
        console.print(t)
        for line in problems(cfg):
            console.print(f"[bold red]failing[/] {line}", highlight=False, soft_wrap=True)
    finally:
        await nc.close()
    console.print(lake_line(cfg.lake_root, cfg.learner.max_staleness))
    console.print(episodes_line(cfg.lake_root))


def lake_line(lake_root: Path, bound: int) -> str:
    """What the lake holds, in one line (the last line of ``rollstream status``)."""
    from consumers.lake import QueryError, query

    try:
        row = query(
            lake_root,
            "SELECT count(*) AS trajectories, avg(reward) FILTER (source = 'online') AS success, "
            "count(DISTINCT policy_version) AS versions, max(policy_version) AS newest FROM trajectories",
        ).to_pylist()[0]
        drops = query(
            lake_root,
            "SELECT count(*) FILTER (fate = 'dropped' AND source = 'online') AS dropped, "
            "count(*) FILTER (source = 'online') AS total, "
            "count(*) FILTER (fate = 'dropped' AND source = 'online' AND reason = 'stale') AS stale, "
            "max(staleness) FILTER (fate = 'trained' AND source = 'online') AS max_trained_staleness, "
            "count(*) FILTER (source = 'replay') AS replayed FROM train_log",
        ).to_pylist()[0]
    except QueryError as exc:
        return f"lake: {exc}"
    success = f"{row['success']:.1%}" if row["success"] is not None else "-"
    return (
        f"lake: {row['trajectories']} trajectories, online success {success}, "
        f"{row['versions']} policy versions (newest {row['newest']}); {_train_line(drops, bound)}"
        f"{idle_line(lake_root)}"
    )


IDLE_SQL = (
    "SELECT coalesce(sum(wait_s), 0) AS wait, coalesce(sum(busy_s), 0) AS busy, count(*) AS steps "
    "FROM train_steps WHERE busy_s > 0"
)


def idle_line(lake_root: Path) -> str:
    """``; learner idle 6.1 % (…)``: the learner's time waiting for a batch over its time in the
    training loop (after any warm start), from ``train_steps``; empty before the first step."""
    from consumers.lake import QueryError, query

    try:
        row = query(lake_root, IDLE_SQL).to_pylist()[0]
    except QueryError:  # a lake from before train_steps had the columns, or none yet
        return ""
    total = float(row["wait"]) + float(row["busy"])
    if not total:
        return ""
    return (
        f"; learner idle {row['wait'] / total:.1%} (waited {row['wait']:.0f} s of {total:.0f} s "
        f"over {row['steps']} steps)"
    )


def _train_line(drops: dict[str, Any], bound: int) -> str:
    """The train log in one line, about online samples only: replays are exempt from the staleness
    bound by design, so they are counted apart and never shown as a staleness."""
    total, stale = drops["total"] or 0, drops["stale"] or 0
    share = f" ({stale / total:.1%} stale)" if total else ""
    newest = drops["max_trained_staleness"]
    return (
        f"train log (online samples): {drops['dropped']} of {total} dropped{share}, "
        f"max trained staleness {'-' if newest is None else newest} (bound {bound}); "
        f"{drops['replayed']} replayed samples (exempt from the bound)"
    )


# Episodes in flight: chunks streamed (chunks_live) but no trajectory row yet; and resumed ones.
EPISODES_SQL = (
    "SELECT (SELECT count(DISTINCT traj_id) FROM chunks_live c "
    "WHERE NOT EXISTS (SELECT 1 FROM trajectories t WHERE t.traj_id = c.traj_id)) AS partial, "
    "(SELECT count(*) FROM trajectories WHERE coalesce(resumed, 0) > 0) AS resumed"
)


def episodes_line(lake_root: Path) -> str:
    """Episodes in progress (durable chunks, no trajectory yet) and episodes resumed after a crash."""
    from consumers.lake import QueryError, query

    try:
        live = query(lake_root, EPISODES_SQL).to_pylist()[0]
    except QueryError as exc:
        return f"episodes: {exc}"
    return (
        f"episodes: {live['partial']} partial (durable chunks, not yet scored), "
        f"{live['resumed']} resumed after a rollout crash"
    )


def _as_ops(cfg: Config) -> Config:
    """The config the ops role connects with: the deployment's credentials, which must exist."""
    from ops.supervisor import with_credentials

    cfg = with_credentials(cfg)
    if cfg.nats.creds_dir and not Path(cfg.nats.creds_dir).exists():
        raise ConnectionError(f"no broker answers at {cfg.nats_url}: is `just up` running?")
    return cfg


def show_status(cfg: Config, console: Console) -> None:
    anyio.run(_status, _as_ops(cfg), console)


async def _scale(cfg: Config, want: dict[str, int]) -> dict[str, Any]:
    nc = await _connect(cfg)
    try:
        msg = await nc.request(f"rs.ops.scale.{cfg.run}", msgspec.json.encode(want), timeout=10)
        return dict(msgspec.json.decode(msg.data))
    except nats.errors.NoRespondersError:
        raise ConnectionError("no supervisor answers for this run: start it with `just up`.") from None
    finally:
        await nc.close()


def request_scale(cfg: Config, want: dict[str, int]) -> dict[str, Any]:
    return anyio.run(_scale, _as_ops(cfg), want)
