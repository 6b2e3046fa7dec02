"""The evaluator's own sandboxes: a private nats-server and an in-process sandboxd, so evaluation
has its own budget and never takes sandboxes (or broker traffic) from a training run."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import nats

from sandboxd import daemon
from sandboxd.client import SandboxClient
from sandboxd.settings import SandboxdSettings
from streams.server import NatsServer


@asynccontextmanager
async def private_sandboxes(settings: SandboxdSettings, max_sandboxes: int) -> AsyncIterator[SandboxClient]:
    """A ``SandboxClient`` on a sandboxd that only this block uses (``max_sandboxes`` at most);
    every container it made is removed when the block exits."""
    instance = f"eval-{secrets.token_hex(3)}"
    own = msgspec.structs.replace(
        settings,
        instance=instance,
        scope=f"{instance}-{os.getpid()}",
        max_sandboxes=max_sandboxes,
        warm_pool=0,
    )
    with tempfile.TemporaryDirectory(prefix="rollstream-eval-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats", log_file=Path(tmp) / "nats.log").start()
        try:
            nc = await nats.connect(server.url, max_reconnect_attempts=2)
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(lambda task_status: daemon.run(own, nc, task_status=task_status))
                    yield SandboxClient(nc, request_timeout_s=120.0)
                    tg.cancel_scope.cancel()
            finally:
                with anyio.move_on_after(10, shield=True):
                    await nc.close()
        finally:
            server.stop()
