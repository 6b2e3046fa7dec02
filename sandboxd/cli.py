"""`rollstream env ...`: build and list environment images (mounted by ops.cli)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sandboxd import envhub
from sandboxd.errors import EnvHubError

env_app = typer.Typer(name="env", help="Sandbox environment images (EnvHub).", no_args_is_help=True)
console = Console()


@env_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="Environment name: a spec in sandboxd/envs/<name>.toml.")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the image exists.")] = False,
) -> None:
    """Build the image of environment NAME (mmdebstrap + docker import)."""
    try:
        tag = envhub.image_tag(name)
        if not force and envhub.image_exists(tag):
            console.print(f"[green]{tag}[/] is already built (use --force to rebuild).")
            return
        with console.status(f"building {tag}") as status:
            envhub.build(name, force=True, progress=lambda line: status.update(f"{tag}: {line[:100]}"))
    except EnvHubError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from exc
    console.print(f"[green]built[/] {tag}")


@env_app.command("list")
def list_() -> None:
    """List environment specs, their image tags and whether they are built."""
    try:
        infos = envhub.list_envs()
    except EnvHubError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from exc
    table = Table("name", "tag", "built", "size")
    for info in infos:
        size = f"{info.size_bytes / 1e6:.0f} MB" if info.size_bytes is not None else "-"
        table.add_row(info.name, info.tag, "yes" if info.built else "no", size)
    console.print(table)
