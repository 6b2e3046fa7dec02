"""Lifecycle under churn and crashes: create/close cycles, and a sandboxd killed with SIGKILL."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxError
from streams.server import NatsServer
from tests.factories import containers_of, running_sandboxd, settings_for_tests

pytestmark = pytest.mark.docker


async def create_close_cycles(nc: NATS, cycles: int) -> None:
    """``cycles`` create -> exec -> close rounds with a warm pool; then none of its containers remain."""
    async with running_sandboxd(nc, settings_for_tests(nc, warm_pool=2)) as owner:
        client = SandboxClient(nc)
        for i in range(cycles):
            created = await client.create()
            assert (await client.exec(created.sandbox_id, f"echo {i}")).stdout == f"{i}\n"
            await client.close(created.sandbox_id)
        live = [c for c in await containers_of(owner) if c.get("State") == "running"]
        assert len(live) <= 2  # only the warm pool is left
    assert await containers_of(owner) == []


async def test_create_close_cycles_leave_zero_containers(nc: NATS, base_image: str) -> None:
    await create_close_cycles(nc, 20)


@pytest.mark.slow
async def test_a_thousand_create_close_cycles_leave_zero_containers(nc: NATS, base_image: str) -> None:
    await create_close_cycles(nc, 1000)


async def test_sigkilled_sandboxd_under_load_leaves_nothing_after_the_next_reaper_pass(
    nc: NATS, nats_server: NatsServer, base_image: str, tmp_path: Path
) -> None:
    victim = f"victim-{secrets.token_hex(3)}"
    scope = settings_for_tests(nc).scope
    argv = [sys.executable, "-m", "sandboxd", "--nats", nats_server.url, "--instance", victim]
    argv += ["--scope", scope, "--max-sandboxes", "8", "--warm-pool", "2"]
    proc = _spawn(argv, tmp_path / "victim.log")
    try:
        client = SandboxClient(nc, request_timeout_s=30)
        ids = [await _create_when_up(client) for _ in range(4)]
        assert all(i.startswith(f"{victim}:") for i in ids)
        async with anyio.create_task_group() as tg:
            for sandbox_id in ids:  # load: commands in flight when the daemon dies
                tg.start_soon(_busy, client, sandbox_id)
            await anyio.sleep(1.5)
            proc.send_signal(signal.SIGKILL)
            tg.cancel_scope.cancel()  # requests in flight would only time out
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert len(await containers_of(victim)) >= 4  # nobody removed them on the way down
        async with running_sandboxd(nc, settings_for_tests(nc)):  # its startup pass reaps the dead owner
            assert await containers_of(victim) == []
    finally:
        proc.kill()
        proc.wait()


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


async def _create_when_up(client: SandboxClient) -> str:
    with anyio.fail_after(60):
        while True:
            try:
                return (await client.create()).sandbox_id
            except SandboxError:  # not subscribed yet
                await anyio.sleep(0.2)


async def _busy(client: SandboxClient, sandbox_id: str) -> None:
    for _ in range(100):
        try:
            await client.exec(sandbox_id, "sleep 0.3; echo busy", timeout_s=5)
        except SandboxError:  # the daemon died under us: expected
            return
