"""Sandboxes for imported tasks: a writable root whose layer is size-limited, a larger /work, and
resources within the server's bounds (more is refused), hardened as every sandbox."""

from __future__ import annotations

import aiodocker
import anyio
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
from sandboxd.errors import SandboxBadRequest, SandboxNotFound
from tests.sandbox_fixtures import running_sandboxd, settings_for_tests

pytestmark = pytest.mark.docker


async def host_config(container: str) -> dict[str, object]:
    async with aiodocker.Docker() as docker:
        info = await docker.containers.get(container)
    return dict(info["HostConfig"])


async def test_a_task_sandbox_has_a_writable_root_a_larger_work_and_bounded_resources(
    nc: NATS, base_image: str
) -> None:
    settings = settings_for_tests(nc, max_cpus=1.5, max_memory_mb=768, max_work_mb=300)
    async with running_sandboxd(nc, settings):
        client = SandboxClient(nc, request_timeout_s=30.0)
        for kw, field in (
            ({"cpus": 64}, "cpus"),
            ({"memory_mb": 100_000}, "memory_mb"),
            ({"work_mb": 10_000}, "work_mb"),
        ):
            with pytest.raises(SandboxBadRequest, match=f"`{field}`.*sandboxd.max_{field}"):
                await client.create(writable_root=True, **kw)  # type: ignore[arg-type]
        created = await client.create(cpus=1.5, memory_mb=768, writable_root=True, work_mb=300)
        try:
            res = await client.exec(
                created.sandbox_id, "echo x > /var/tmp/made-here && cat /var/tmp/made-here && df -m /work"
            )
            assert res.exit_code == 0 and res.stdout.startswith("x\n"), res
            assert " 300 " in res.stdout.splitlines()[-1]  # /work: work_mb
            hc = await host_config(created.container)
            assert hc["NanoCpus"] == int(1.5e9) and hc["Memory"] == 768 * 1024 * 1024
            assert hc["ReadonlyRootfs"] is False and hc["CapDrop"] == ["ALL"] and hc["NetworkMode"] == "none"
            plain = await client.create()
            res = await client.exec(plain.sandbox_id, "echo x > /var/tmp/made-here")
            assert res.exit_code != 0 and "Read-only" in res.stderr  # other sandboxes keep a read-only root
        finally:
            await client.close(created.sandbox_id)


async def test_a_writable_root_that_outgrows_its_limit_is_removed(nc: NATS, base_image: str) -> None:
    settings = settings_for_tests(nc, rootfs_mb=2, rootfs_check_s=0.2)
    async with running_sandboxd(nc, settings):
        client = SandboxClient(nc, request_timeout_s=30.0)
        created = await client.create(writable_root=True)
        res = await client.exec(created.sandbox_id, "head -c 1000000 /dev/zero > /var/tmp/small && echo ok")
        assert res.stdout == "ok\n"
        await anyio.sleep(0.6)
        assert (await client.exec(created.sandbox_id, "true")).exit_code == 0  # under the limit: kept
        await client.exec(created.sandbox_id, "head -c 8000000 /dev/zero > /var/tmp/big")
        with anyio.fail_after(10):
            while True:
                await anyio.sleep(0.3)
                try:
                    await client.exec(created.sandbox_id, "true")
                except SandboxNotFound:
                    break
