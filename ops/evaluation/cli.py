"""``rollstream tasks import PATH`` and ``rollstream eval ...`` (mounted by ``ops.cli``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import anyio
import msgspec
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ops.config import Config, ConfigError, load_config
from ops.evaluation.evaluate import EvalError, Outcome, evaluate, load_task_set, resolve_policy
from ops.evaluation.policy import PolicyError
from ops.evaluation.summary import broken, table
from ops.logs import configure_logging
from producers.families import import_tasks
from producers.families.imported import Imported, prepare

tasks_app = typer.Typer(
    name="tasks", help="Import Harbor, Terminal-Bench and SWE-style tasks.", no_args_is_help=True
)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="rollstream.toml to read.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value.")]
Network = Literal["none", "default"]


def _fail(message: str) -> typer.Exit:
    err.print(Text("error: ", style="bold red") + Text(message))
    return typer.Exit(2)


def _config(path: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def import_table(items: list[Imported]) -> Table:
    """Per task: its format, whether it imports, its image and its build time."""
    t = Table("task", "format", "status", "image", "build", title="tasks")
    for i in items:
        status = "[green]ok[/]" if i.ok else "[red]error[/]"
        if i.ok and any(p.severity == "warning" for p in i.problems):
            status = "[yellow]ok, warnings[/]"
        image = i.task.image if i.ok and i.task else "-"
        t.add_row(i.name, i.format, status, image, f"{i.build_s:.1f} s" if i.build_s else "-")
    return t


def problem_lines(items: list[Imported]) -> list[Text]:
    """One line per problem: ``task: file [field]: message`` (a build's output tail indented)."""
    lines = []
    for i in items:
        for p in i.problems:
            style = "yellow" if p.severity == "warning" else "red"
            head, *rest = str(p).splitlines()
            lines.append(Text(f"{i.name}: {p.severity}: {head}", style=style))
            lines += [Text(f"    {line}") for line in rest]
    return lines


@tasks_app.command("import")
def import_command(
    path: Annotated[
        Path, typer.Argument(help="A task directory, a folder of them, or a SWE instances JSONL.")
    ],
    build: Annotated[bool, typer.Option(help="Build each distinct environment image (cached).")] = True,
    network: Annotated[
        str, typer.Option(help="Network of image builds: none (offline) or default.")
    ] = "none",
) -> None:
    """Validate tasks (and build their images); report per task what is missing, with file and field."""
    items = import_tasks(path)
    if build:
        with out.status("building environments") as status:
            items = prepare(items, network=network, progress=lambda line: status.update(f"building {line}"))
    out.print(import_table(items))
    for line in problem_lines(items):
        out.print(line)
    ok = sum(i.ok for i in items)
    out.print(f"{ok} of {len(items)} tasks importable" + ("" if build else " (images not built: --no-build)"))
    if ok < len(items):
        raise typer.Exit(1)


def _print(outcomes: list[Outcome], agent: str) -> None:
    out.print(table([o.summary for o in outcomes]))
    if agent == "oracle":
        bad = broken(outcomes[0].records)
        for task, why in bad.items():
            out.print(Text(f"broken: {task}: {why}", style="red"))
        out.print(f"{outcomes[0].summary.tasks - len(bad)} of {outcomes[0].summary.tasks} oracles pass")


def eval_command(
    tasks: Annotated[
        Path, typer.Option("--tasks", help="Task directory, folder of them, or SWE instances JSONL.")
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", help="latest, v<N> or a checkpoint directory (repeat to compare)."),
    ] = None,
    k: Annotated[
        int, typer.Option("--k", min=1, help="Attempts per task; pass@1 and pass@k are reported.")
    ] = 4,
    concurrency: Annotated[int, typer.Option(min=1, help="Attempts at once (own sandboxes).")] = 2,
    agent: Annotated[str, typer.Option(help="policy, or oracle: the tasks' reference solutions.")] = "policy",
    every: Annotated[
        int, typer.Option(min=0, help="Keep running: evaluate every N-th published version (0 = once).")
    ] = 0,
    pass_threshold: Annotated[float, typer.Option(help="An attempt passes at this reward or more.")] = 1.0,
    network: Annotated[str, typer.Option(help="Network of image builds: none or default.")] = "none",
    config_path: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """pass@1 and pass@k of policy versions (or oracles) on a task set; attempts go to the lake's `evals`."""
    cfg = _config(config_path, overrides)
    configure_logging(cfg.log_level if cfg.log_level != "info" else "warning")
    if agent not in ("policy", "oracle"):
        raise _fail(f"--agent {agent!r}: choose policy or oracle")
    if every > 0:
        from ops.evaluation.worker import watch

        watched = with_eval(cfg, tasks, every, k, concurrency, pass_threshold, network)
        try:
            anyio.run(lambda: watch(watched))
        except KeyboardInterrupt:
            pass
        return
    try:
        policies = [resolve_policy(cfg, p) for p in (policy or ["latest"])] if agent == "policy" else []
        with out.status("building environments"):
            task_list, items = load_task_set(tasks, network=network)
    except (EvalError, PolicyError) as exc:
        raise _fail(str(exc)) from None
    if skipped := [i for i in items if not i.ok]:
        out.print(f"[yellow]{len(skipped)} tasks do not import[/] (see `rollstream tasks import {tasks}`)")
    outcomes = anyio.run(
        lambda: evaluate(
            cfg,
            task_list,
            task_set=str(tasks),
            agent=agent,  # type: ignore[arg-type]
            policies=policies,
            k=k,
            concurrency=concurrency,
            pass_threshold=pass_threshold,
        )
    )
    _print(outcomes, agent)
    out.print(f"{sum(len(o.records) for o in outcomes)} attempts written to {cfg.lake_root}/evals")


def with_eval(
    cfg: Config, tasks: Path, every: int, k: int, concurrency: int, pass_threshold: float, network: str
) -> Config:
    """``cfg`` with its ``[eval]`` section set from the command line."""
    section = msgspec.structs.replace(
        cfg.eval,
        tasks=str(tasks),
        every=every,
        k=k,
        concurrency=concurrency,
        pass_threshold=pass_threshold,
        build_network=network,
    )
    return msgspec.structs.replace(cfg, eval=section)
