"""Fixture chain: store_dir -> nats_server (real nats-server, -js) -> nc -> js."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from streams.server import NatsServer

pytest_plugins = ["tests.sandbox_fixtures", "tests.task_fixtures"]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "jetstream"


@pytest.fixture
def nats_server(store_dir: Path, tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=store_dir, log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=2)
    yield client
    await client.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()
