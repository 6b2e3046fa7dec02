"""Fixtures, registered once for every test module.

Fixture chain: store_dir -> nats_server (real nats-server, -js) -> nc -> js; a broker started with
per-role credentials; the tiny policy. Sandbox fixtures (real Docker) live in the plugin
``tests/sandbox_fixtures.py``; plain builders in ``tests/factories``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ops.security import write_server_config
from streams.server import NatsServer
from tests.factories import BROKER_RUN, Broker, make_tiny_policy

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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A nats-server (JetStream) started with the generated config: per-role credentials for
    ``BROKER_RUN`` and no anonymous access."""
    conf, creds_dir = tmp_path / "nats.conf", tmp_path / "creds"
    write_server_config(conf, creds_dir, run=BROKER_RUN)
    server = NatsServer(store_dir=tmp_path / "js", config_file=conf, log_file=tmp_path / "nats.log").start()
    yield Broker(server, creds_dir, conf)
    server.stop()


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy checkpoint (tokenizer and random weights), made once per session."""
    return make_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")
