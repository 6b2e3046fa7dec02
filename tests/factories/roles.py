"""Role sessions on a nats-server started with per-role credentials (the ``broker`` fixture)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS

from ops.security import inbox_prefix, role_credentials
from streams.server import NatsServer

BROKER_RUN = "t1"  # the run the ``broker`` fixture writes role credentials for
DENY_TIMEOUT_S = 0.5  # a denied request never gets a reply; the -ERR arrives within milliseconds


@dataclass
class Broker:
    server: NatsServer
    creds_dir: Path
    conf: Path


@dataclass
class Session:
    nc: NATS
    errors: list[Exception]

    @property
    def js(self) -> Any:
        return self.nc.jetstream(timeout=5)

    @property
    def deny_js(self) -> Any:
        """A JetStream context that gives up quickly, for requests the server will refuse."""
        return self.nc.jetstream(timeout=DENY_TIMEOUT_S)

    async def permission_errors(self) -> list[str]:
        await anyio.sleep(0.1)  # the -ERR arrives on the reader task just after the request times out
        return [str(e).lower() for e in self.errors if "permissions violation" in str(e).lower()]


async def login(broker: Broker, role: str) -> Session:
    """Connect to ``broker`` with ``role``'s credentials, keeping every async error it reports."""
    user, password = role_credentials(broker.creds_dir, role)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        broker.server.url,
        user=user,
        password=password,
        inbox_prefix=inbox_prefix(role),
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )
    return Session(nc, errors)


async def assert_denied(session: Session, op: Awaitable[Any], verb: str, subj: str) -> None:
    """``op`` fails and the server reports a permissions violation for ``verb`` on ``subj`` (a prefix)."""
    with pytest.raises(Exception):  # noqa: B017 - nats-py times out (or raises NoResponders) on a denied request
        await op
    violations = await session.permission_errors()
    assert any(f'{verb} to "{subj}'.lower() in v for v in violations), violations


async def serve_sandbox_create(sandboxd: Session) -> None:
    """Answer ``rs.sandbox.create`` as sandboxd would, echoing ``created:<env>``."""

    async def reply(msg: Any) -> None:
        await msg.respond(b"created:" + msg.data)

    await sandboxd.nc.subscribe("rs.sandbox.create", queue="sandboxd", cb=reply)
    await sandboxd.nc.flush()
