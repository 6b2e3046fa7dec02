"""`python -m sandboxd [--nats URL] [--instance NAME]`: run one sandboxd until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import anyio
import nats
import structlog
import typer

from sandboxd import daemon
from sandboxd.settings import SandboxdSettings

cli = typer.Typer(add_completion=False)


async def _main(settings: SandboxdSettings, url: str) -> None:
    nc = await nats.connect(url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, tg.cancel_scope)
            owner = await tg.start(daemon.run, settings, nc)
            structlog.get_logger().info("sandboxd.serving", owner=owner, nats=url)
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _configure_logging() -> None:
    renderer = structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


@cli.command()
def main(
    nats_url: Annotated[str, typer.Option("--nats", help="NATS server URL.")] = "nats://127.0.0.1:4222",
    instance: Annotated[str, typer.Option(help="Owner name of this instance (default: sbx-<6 hex>).")] = "",
    max_sandboxes: Annotated[int, typer.Option(help="Live sandboxes held at most.")] = 32,
    scope: Annotated[str, typer.Option(help="Reaper scope label.")] = "default",
    warm_pool: Annotated[int, typer.Option(help="Ready containers kept per warm environment.")] = 2,
) -> None:
    """Run a sandbox daemon on NATS until interrupted; its containers are removed on exit."""
    _configure_logging()
    settings = SandboxdSettings(
        instance=instance, max_sandboxes=max_sandboxes, scope=scope, warm_pool=warm_pool
    )
    anyio.run(_main, settings, nats_url)


if __name__ == "__main__":
    cli()
