"""The ``rollstream`` command line (typer: typed options, help text and errors for free).

Every user error is one sentence on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from ops.config import Config, ConfigError, load_config
from ops.evaluation.cli import eval_command, tasks_app
from ops.lake_cli import filter_app, lake_app, replay_command, resample_command
from sandboxd.cli import env_app

app = typer.Typer(
    name="rollstream",
    help="Asynchronous agentic RL on NATS JetStream: sandboxes, IPA training, a Parquet trajectory lake.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(env_app, name="env")
app.add_typer(lake_app, name="lake")
app.add_typer(filter_app, name="filter")
app.command("replay")(replay_command)
app.command("resample")(resample_command)
app.add_typer(tasks_app, name="tasks")
app.command("eval")(eval_command)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="rollstream.toml to read (default: ./rollstream.toml if present)."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value (repeatable).")
]


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, for logs
    return typer.Exit(2)


def config(path: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None


@app.command()
def up(
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    duration: Annotated[
        float, typer.Option(help="Stop after this many seconds (0 = until Ctrl-C / just down).")
    ] = 0.0,
    quiet: Annotated[
        bool, typer.Option(help="A progress line every 15 s instead of the live table.")
    ] = False,
) -> None:
    """Start the broker and every worker, show progress until interrupted."""
    from ops.logs import configure_logging
    from ops.supervisor import PreflightError
    from ops.supervisor import up as run_up

    cfg = config(config_path, overrides)
    cfg.state.mkdir(parents=True, exist_ok=True)
    (cfg.state / "logs").mkdir(exist_ok=True)
    configure_logging(cfg.log_level, json_file=cfg.state / "logs" / "supervisor.log")
    try:
        run_up(cfg, duration_s=duration, quiet=quiet)
    except PreflightError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


@app.command()
def down(config_path: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Stop a running deployment; leave no process and no sandbox container behind."""
    from ops.supervisor import down as run_down

    done = run_down(config(config_path, overrides))
    for line in done or ["nothing was running"]:
        out.print(line)


@app.command()
def status(config_path: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Per group: processes, pending and redelivered messages; policy version; lake totals."""
    from ops.status import show_status

    try:
        show_status(config(config_path, overrides), out)
    except ConnectionError as exc:
        raise fail(str(exc)) from None


@app.command()
def query(
    sql: Annotated[
        str, typer.Argument(help="SQL over the views trajectories, chunks, train_log, train_steps, tasks.")
    ],
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: Annotated[Path | None, typer.Option(help="Lake root (default: the configured one).")] = None,
    fmt: Annotated[
        Literal["table", "csv", "json", "parquet"], typer.Option("--format", help="Output format.")
    ] = "table",
    output: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File for csv/json/parquet output (csv/json: stdout without it)."),
    ] = None,
    max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
) -> None:
    """Run SQL over the trajectory lake with DuckDB (csv and json go to stdout without --out)."""
    from consumers.lake import QueryError, write_result
    from consumers.lake import query as run_query
    from ops.lake_cli import render_table, write_stdout

    if fmt == "parquet" and output is None:
        raise fail("--format parquet writes a binary file: add --out PATH.")
    root = lake or config(config_path, overrides).lake_root
    try:
        table = run_query(root, sql)
    except QueryError as exc:
        raise fail(str(exc)) from None
    if fmt == "table":
        out.print(render_table(table, max_rows=max_rows))
    elif output is None:
        write_stdout(table, fmt)
    else:
        try:
            write_result(table, output, fmt)
        except OSError as exc:
            raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
        out.print(f"wrote {table.num_rows} rows to {output}")


@app.command()
def scale(
    counts: Annotated[list[str], typer.Argument(help="group=N pairs, e.g. rollout=3 reward=2.")],
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Change the process counts of a running deployment."""
    from ops.status import request_scale

    want: dict[str, int] = {}
    for item in counts:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise fail(f"{item!r}: use group=N, e.g. rollout=3")
        want[name] = int(n)
    try:
        result = request_scale(config(config_path, overrides), want)
    except ConnectionError as exc:
        raise fail(str(exc)) from None
    if not result.get("ok"):
        raise fail(str(result.get("error")))
    out.print("processes: " + ", ".join(f"{k}×{v}" for k, v in result["counts"].items()))


@app.command()
def worker(
    name: Annotated[str, typer.Argument(help="sandboxd, producer, rollout, reward, learner or lake.")],
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    nats_url: Annotated[str | None, typer.Option("--nats", help="Broker URL (overrides nats.url).")] = None,
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT (0 = off).")
    ] = 0,
) -> None:
    """Run one worker process (what `just up` starts; use it to add workers on other hosts)."""
    import anyio

    from ops.health import ErrorTally, WorkerFailed
    from ops.logs import configure_logging
    from ops.pipeline import WORKERS
    from ops.worker import run_worker

    if name not in WORKERS:
        raise fail(f"unknown worker {name!r}; choose one of {', '.join(WORKERS)}")
    extra = [f'nats.url="{nats_url}"'] if nats_url else []
    cfg = config(config_path, [*(overrides or []), *extra])
    tally = ErrorTally()
    configure_logging(cfg.log_level, observers=[tally.observe])
    try:
        anyio.run(run_worker, name, cfg, metrics_port, tally)
    except OSError as exc:
        raise fail(f"cannot reach the broker at {cfg.nats_url}: {exc}") from None
    except WorkerFailed as exc:
        raise fail(f"{exc} (see {name}'s log)") from None


@app.command()
def serve(
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    index: Annotated[int, typer.Option(help="Server k of several: listens on serve.port + k.")] = 0,
) -> None:
    """An OpenAI-compatible completions server over the torch engine (token ids and logprobs out,
    weights reloaded through /update_weights_from_disk); the target of rollout.engine = openai."""
    import anyio

    from ops.logs import configure_logging
    from ops.serve import run_server
    from ops.worker import set_torch_threads

    cfg = config(config_path, overrides)
    configure_logging(cfg.log_level)
    set_torch_threads(cfg.torch_threads)
    if not (cfg.policy_dir / "config.json").exists():
        raise fail(f"no policy at {cfg.policy_dir}: run `rollstream init-policy` first.")
    try:
        anyio.run(run_server, cfg, index)
    except OSError as exc:
        raise fail(
            f"cannot listen on {cfg.serve.host}:{cfg.serve.port + index}: {exc.strerror or exc}"
        ) from None


@app.command()
def report(
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
    lake: Annotated[Path | None, typer.Option(help="Lake root (default: the configured one).")] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the PNGs and summary.txt.")
    ] = Path("report"),
    run: Annotated[str | None, typer.Option(help="Only this run (default: every run in the lake).")] = None,
) -> None:
    """Write PNG plots (success and reward by version, staleness, throughput, loss) and a summary."""
    from consumers.lake import LakeError
    from ops.report import report_command

    root = lake or config(config_path, overrides).lake_root
    try:
        report_command(root, out_dir, run)
    except LakeError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None


@app.command("init-policy")
def init_policy(config_path: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Create the tiny Qwen2 policy and its tokenizer (a Hugging Face checkpoint) if missing."""
    from agent_harness.policy_init import create_tiny_policy
    from producers.families.files import corpus

    cfg = config(config_path, overrides)
    path = create_tiny_policy(cfg.policy_dir, corpus(seed=0), seed=0)
    out.print(f"policy checkpoint: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(app())
