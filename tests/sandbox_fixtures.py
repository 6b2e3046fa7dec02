"""Sandbox fixtures (real Docker engine, real nats-server): environment images, a running sandboxd
and a client on it. A pytest plugin listed in ``tests/conftest.py``; helpers are in ``tests/factories``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps
from sandboxd.envhub import ensure_image
from tests.factories import running_sandboxd, settings_for_tests


@pytest.fixture(scope="session")
def base_image() -> str:
    """The tag of the base environment image, built on first use (mmdebstrap, ~30 s)."""
    return ensure_image("base")


@pytest.fixture(scope="session")
def gem_image() -> str:
    """The ``gem`` environment image (mmdebstrap + python3 + wheels built on the host; ~90 s once)."""
    return ensure_image("gem")


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
