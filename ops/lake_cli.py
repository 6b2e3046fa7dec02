"""Operator commands over the lake: ``lake compact``, ``filter run``, ``replay``, ``resample``, and
the terminal rendering and output of ``rollstream query``. The lake itself is ``consumers.lake``.

Mount in ``ops/cli.py``::

    from ops.lake_cli import filter_app, lake_app, replay_command, resample_command

    app.add_typer(lake_app, name="lake")
    app.add_typer(filter_app, name="filter")
    app.command("replay")(replay_command)
    app.command("resample")(resample_command)

User errors (bad SQL, bad config, no broker) are one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import pyarrow as pa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from consumers.lake import LakeError, QueryError, count_selected, write_result
from consumers.lake.export import Format
from ops.config import Config, ConfigError, load_config

T = TypeVar("T")
out = Console()
err = Console(stderr=True)

lake_app = typer.Typer(help="Maintain the Parquet trajectory lake.", no_args_is_help=True)
filter_app = typer.Typer(
    help="Data filters whose verdicts land in the lake table `filters`.", no_args_is_help=True
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="rollstream.toml to read (default: ./rollstream.toml if present)."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable).")
]
LakeOpt = Annotated[Path | None, typer.Option(help="Lake root (default: the configured one).")]
RunOpt = Annotated[str | None, typer.Option(help="Run (default: the configured run).")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _config(path: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _run_config(
    path: Path | None, overrides: list[str] | None, run: str | None, lake: Path | None
) -> tuple[Config, Path]:
    """The configuration (``--run`` applied) and the lake root (``--lake`` or the configured one)."""
    cfg = _config(path, [*(overrides or []), *([f'run="{run}"'] if run else [])])
    return cfg, lake or cfg.lake_root


def _count(root: Path, sql: str) -> int:
    """How many trajectories ``sql`` selects; a bad query is a clean error exit."""
    try:
        return count_selected(root, sql)
    except QueryError as exc:
        raise _fail(str(exc)) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _with_broker(cfg: Config, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Connect as the ops role (with the deployment's credentials, as `status` does), make sure the
    run's topology exists, run ``work(nc, js)``."""
    from ops.supervisor import with_credentials
    from ops.worker import connect
    from streams.topology import ensure

    deployed = with_credentials(cfg)
    if deployed.nats.creds_dir and Path(deployed.nats.creds_dir).exists():
        cfg = deployed  # `rollstream up` wrote them: the embedded broker refuses anonymous clients

    async def main() -> T:
        nc = await connect(cfg, "ops", max_reconnect_attempts=2)
        try:
            js = nc.jetstream(timeout=10)
            await ensure(js, cfg.run)
            return await work(nc, js)
        finally:
            with anyio.move_on_after(5, shield=True):
                await nc.drain()

    try:
        return anyio.run(main)
    except OSError as exc:
        raise _fail(f"cannot reach the broker at {cfg.nats_url}: {exc}") from None


# --- rollstream query: terminal tables and standard output ------------------------------------

_MAX_CELL = 60
_MAX_ITEMS = 8


def _truncate(text: str, limit: int = _MAX_CELL) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_value(value: Any) -> str:
    """A short, readable rendering of one cell (floats to 6 significant digits, long lists elided)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        items = [format_value(v) for v in value[:_MAX_ITEMS]]
        if len(value) > _MAX_ITEMS:
            items.append(f"… +{len(value) - _MAX_ITEMS}")
        return _truncate("[" + ", ".join(items) + "]")
    if isinstance(value, dict):
        return _truncate("{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}")
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return _truncate(str(value))


def render_table(table: pa.Table, *, max_rows: int = 50) -> Table:
    """A rich table of the first ``max_rows`` rows; the caption says how many rows there are."""
    shown = table.slice(0, max_rows)
    caption = f"{table.num_rows} rows"
    if table.num_rows > max_rows:
        caption = f"first {max_rows} of {table.num_rows} rows"
    out = Table(caption=caption, header_style="bold")
    for field in table.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        out.add_column(field.name, justify="right" if numeric else "left", overflow="fold")
    # Column-wise, so duplicate column names (``SELECT 1 AS a, 2 AS a``) keep both values.
    for row in zip(*(column.to_pylist() for column in shown.columns), strict=True):
        # Text cells: a value like "[bold]" is data, never rich markup.
        out.add_row(*(Text(format_value(v), style="dim" if v is None else "") for v in row))
    return out


def write_stdout(table: pa.Table, fmt: Format) -> None:
    """A result on standard output (the CLI refuses parquet there: it is binary); a reader that
    stops early (``| head``) is no error."""
    try:
        write_result(table, sys.stdout.buffer, fmt)
    except BrokenPipeError:
        # Python would complain when it flushes stdout at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- lake maintenance, replay, resampling, filters ---------------------------------------------


@lake_app.command("compact")
def compact_command(
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: LakeOpt = None,
    run: Annotated[str | None, typer.Option(help="Only this run's partitions (default: all).")] = None,
) -> None:
    """Merge each partition's parts into one, drop redelivered copies, remove orphaned temp files."""
    from consumers.lake import compact

    root = lake or _config(config_path, overrides).lake_root
    try:
        stats = compact(root, run=run)
    except LakeError as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"compacted {root}", header_style="bold")
    for column in ("partitions", "parts before", "parts after", "rows before", "rows after", "orphans"):
        table.add_column(column, justify="right")
    table.add_row(
        *map(
            str,
            (
                stats.partitions,
                stats.parts_before,
                stats.parts_after,
                stats.rows_before,
                stats.rows_after,
                stats.orphans_removed,
            ),
        )
    )
    out.print(table)
    for name, removed in sorted(stats.tables.items()):
        if removed:
            out.print(f"{name}: {removed} duplicate rows removed")


def replay_command(
    sql: Annotated[str, typer.Option("--sql", help="SELECT traj_id FROM trajectories WHERE ...")],
    mode: Annotated[Literal["sft", "ipa"], typer.Option(help="How the learner trains the samples.")] = "ipa",
    run: RunOpt = None,
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: LakeOpt = None,
) -> None:
    """Publish trajectories chosen by SQL over the lake to the learner as replay samples."""
    from producers.replay import replay

    cfg, root = _run_config(config_path, overrides, run, lake)
    total = _count(root, sql)
    if not total:
        out.print("the query selects no trajectories; nothing to replay")
        return

    async def work(_nc: Any, js: Any) -> int:
        with _progress() as bar:
            task = bar.add_task(f"replay ({mode})", total=total)
            return await replay(
                js, root, sql, run=cfg.run, mode=mode, on_progress=lambda n: bar.advance(task, n)
            )

    sent = _with_broker(cfg, work)
    out.print(f"published {sent} replay samples ({mode}) to rs.traj.scored.{cfg.run}")


def resample_command(
    sql: Annotated[str, typer.Option("--sql", help="SELECT traj_id FROM trajectories WHERE ...")],
    from_chunk: Annotated[
        int, typer.Option("--from-chunk", min=1, help="Restart after this many tool calls.")
    ],
    samples: Annotated[int, typer.Option(min=1, help="Rollouts per restart point (one group).")] = 1,
    run: RunOpt = None,
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: LakeOpt = None,
) -> None:
    """Create tasks that restart chosen trajectories at chunk K (first K tool calls replayed)."""
    from producers.resample import resample

    cfg, root = _run_config(config_path, overrides, run, lake)
    total = _count(root, sql)

    async def work(_nc: Any, js: Any) -> Any:
        with _progress() as bar:
            task = bar.add_task(f"resample from chunk {from_chunk}", total=total)
            return await resample(
                js,
                root,
                sql,
                run=cfg.run,
                from_chunk=from_chunk,
                samples=samples,
                on_progress=lambda n: bar.advance(task, n),
            )

    result = _with_broker(cfg, work)
    out.print(
        f"published {result.published} task samples from {result.trajectories} trajectories "
        f"to rs.tasks.{cfg.run}"
    )
    for traj_id, why in list((result.skipped or {}).items())[:10]:
        err.print(f"skipped {traj_id}: {why}", highlight=False)


@filter_app.command("run")
def filter_run_command(
    stage: Annotated[
        Literal["heuristic", "reverify", "security"], typer.Option(help="The filter stage to run.")
    ],
    sql: Annotated[
        str | None, typer.Option("--sql", help="Trajectories to judge (default: all of the run).")
    ] = None,
    run: RunOpt = None,
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: LakeOpt = None,
) -> None:
    """Judge trajectories with one filter stage and write the verdicts to the lake."""
    from ops.filters import default_sql, run_stage

    cfg, root = _run_config(config_path, overrides, run, lake)
    query_sql = sql or default_sql(cfg.run)
    total = _count(root, query_sql)

    async def judge(sandbox: Any) -> Any:
        with _progress() as bar:
            task = bar.add_task(f"filter {stage}", total=total)
            return await run_stage(
                root,
                stage,
                sql=query_sql,
                sandbox=sandbox,
                verify_timeout_s=cfg.reward.verify_timeout_s,
                on_progress=lambda n: bar.advance(task, n),
            )

    if stage == "reverify":
        from sandboxd.client import SandboxClient

        counts = _with_broker(cfg, lambda nc, _js: judge(SandboxClient(nc)))
    else:
        counts = anyio.run(judge, None)
    summary = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("pass", "flag", "fail"))
    out.print(f"{stage}: {summary} (query them: SELECT * FROM filters WHERE stage = '{stage}')")
