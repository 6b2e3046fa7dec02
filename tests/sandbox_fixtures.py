"""Sandbox fixtures (real Docker engine, real nats-server): environment images, a running sandboxd
and a client on it. A pytest plugin listed in ``tests/conftest.py``; helpers are in ``tests/factories``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
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
