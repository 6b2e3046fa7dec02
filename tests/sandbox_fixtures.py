"""Sandbox fixtures (real Docker engine, real nats-server): a running sandboxd and a client on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from sandboxd import daemon
from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps
from sandboxd.envhub import ensure_image
from sandboxd.settings import SandboxdSettings


def settings_for_tests(nc: NATS, **overrides: object) -> SandboxdSettings:
    """Settings for a test daemon: few sandboxes (capacity is cheap to hit), a fast reaper, no warm
    pool (tests count containers; pool tests ask for one), and a reaper scope of this test's own
    nats-server, so parallel test runs never reap each other."""
    port = nc.connected_url.port if nc.connected_url else 0
    fields: dict[str, object] = {
        "max_sandboxes": 3,
        "reaper_interval_s": 0.5,
        "ping_timeout_s": 0.5,
        "scope": f"test-{port}",
        "warm_pool": 0,
    }
    return SandboxdSettings(**(fields | overrides))  # type: ignore[arg-type]


class _Started(TaskStatus[str]):
    """Stands in for anyio's TaskStatus when the daemon runs as a bare asyncio task."""

    def __init__(self) -> None:
        self.future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def started(self, value: str | None = None) -> None:
        self.future.set_result(value or "")


@contextlib.asynccontextmanager
async def running_sandboxd(nc: NATS, settings: SandboxdSettings) -> AsyncIterator[str]:
    """Run ``daemon.run`` in a background task until the block exits; yields the owner name."""
    status = _Started()
    task = asyncio.create_task(daemon.run(settings, nc, task_status=status))
    pending: set[asyncio.Future[object]] = {task, status.future}  # type: ignore[arg-type]
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why the daemon did not start
        raise RuntimeError("sandboxd returned before it started")
    try:
        yield status.future.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(scope="session")
def base_image() -> str:
    """The tag of the base environment image, built on first use (mmdebstrap, ~30 s)."""
    return ensure_image("base")


@pytest.fixture
async def sandboxd_owner(nc: NATS, base_image: str) -> AsyncIterator[str]:
    """A sandboxd instance serving on ``nc``; yields its owner name, removes its containers after."""
    async with running_sandboxd(nc, settings_for_tests(nc)) as owner:
        yield owner


@pytest.fixture
async def sandbox_client(nc: NATS, sandboxd_owner: str) -> SandboxClient:
    return SandboxClient(nc, request_timeout_s=30.0)


@pytest.fixture
async def sandbox_id(sandbox_client: SandboxClient) -> AsyncIterator[str]:
    """One fresh base sandbox, closed after the test."""
    created = await sandbox_client.create()
    yield created.sandbox_id
    with anyio.move_on_after(30, shield=True):
        await sandbox_client.close(created.sandbox_id)


async def root_exec(container: str, script: str, *, stdin: bytes | None = None) -> tuple[int | None, str]:
    """Run ``script`` as root in a sandbox's container through Docker: the host's (or a compromised
    helper's) view, which no agent command has. Returns (exit code, stdout + stderr)."""
    async with DockerOps() as ops:
        out = await ops.exec(container, ["sh", "-c", script], stdin=stdin, user="0:0", deadline_s=60)
    return out.exit_code, out.stdout.text() + out.stderr.text()


async def driver_pids(container: str) -> list[int]:
    """Pids (in the container) of its session drivers."""
    _, out = await root_exec(
        container,
        "for p in /proc/[0-9]*; do grep -qa '^sandboxd-session' $p/cmdline && echo ${p#/proc/}; done",
    )
    return [int(p) for p in out.split()]
