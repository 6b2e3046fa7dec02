"""sandboxd against a real nats-server and the real Docker engine."""

from __future__ import annotations

import time

import aiodocker
import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from sandboxd import envhub
from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps, container_config
from sandboxd.errors import SandboxBadRequest, SandboxCapacity, SandboxNotFound, SandboxStartupFailed
from sandboxd.reaper import ORPHAN_GRACE_S, reap_once
from schemas.sandbox import CreateRequest
from tests.factories import containers_of, running_sandboxd, settings_for_tests

pytestmark = pytest.mark.docker


async def container_exists(container_prefix: str) -> bool:
    async with aiodocker.Docker() as docker:
        try:
            await docker.containers.get(container_prefix)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise
        return True


async def test_created_sandbox_runs_echo_and_close_removes_its_container(
    sandbox_client: SandboxClient, sandboxd_owner: str
) -> None:
    created = await sandbox_client.create()
    assert created.owner == sandboxd_owner
    assert created.sandbox_id.startswith(f"{sandboxd_owner}:")
    assert created.image == envhub.image_tag("base")
    result = await sandbox_client.exec(created.sandbox_id, "echo hi; echo oops >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hi\n", "oops\n")
    assert not (result.timed_out or result.truncated or result.oom_killed)
    await sandbox_client.close(created.sandbox_id)
    assert created.container == f"rs-{settings_for_tests(sandbox_client.nc).scope}-{created.sandbox_id[-12:]}"
    assert not await container_exists(created.container)


async def test_container_is_hardened_with_labels_and_limits(
    sandbox_client: SandboxClient, sandboxd_owner: str
) -> None:
    created = await sandbox_client.create(
        memory_mb=128, pids=64, labels={"rollstream.traj": "t1", "rollstream.owner": "forged"}
    )
    async with aiodocker.Docker() as docker:
        info = await docker.containers.get(created.container)
        host, labels = info["HostConfig"], info["Config"]["Labels"]
    assert info["Name"] == f"/{created.container}"
    assert labels["rollstream.sandbox"] == "1" and labels["rollstream.owner"] == sandboxd_owner
    assert labels["rollstream.traj"] == "t1" and float(labels["rollstream.expires"]) > time.time()
    assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == ["KILL", "SETGID", "SETPCAP", "SETUID"]  # the root helpers' only powers
    assert host["SecurityOpt"][0] == "no-new-privileges" and host["SecurityOpt"][1].startswith("seccomp=")
    assert host["Init"] is True and host["Runtime"] == "runc" and host["LogConfig"]["Type"] == "none"
    assert {"Name": "core", "Soft": 0, "Hard": 0} in host["Ulimits"]
    assert not any(u["Name"] == "nproc" for u in host["Ulimits"])  # a per-uid limit, host-wide
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024 and host["PidsLimit"] == 64
    await sandbox_client.close(created.sandbox_id)


async def test_work_is_the_writable_default_cwd(sandbox_client: SandboxClient, sandbox_id: str) -> None:
    result = await sandbox_client.exec(sandbox_id, "pwd && echo data > f.txt && cat /work/f.txt")
    assert (result.exit_code, result.stdout) == (0, "/work\ndata\n")


async def test_network_egress_fails_and_only_loopback_exists(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    egress = await sandbox_client.exec(sandbox_id, "cat < /dev/tcp/1.1.1.1/53", timeout_s=5)
    assert egress.exit_code != 0 and not egress.timed_out
    interfaces = await sandbox_client.exec(sandbox_id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert interfaces.stdout.split() == ["lo"]


async def test_command_past_its_timeout_returns_timed_out_and_its_processes_are_gone(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    started = time.monotonic()
    # The setsid'd child escapes the process group; the kill by the agent's uid gets it too.
    result = await sandbox_client.exec(
        sandbox_id, "echo before; setsid sleep 100001 >/dev/null 2>&1 & sleep 100000", timeout_s=1
    )
    assert result.timed_out and result.stdout == "before\n"
    assert time.monotonic() - started < 8
    ps = await sandbox_client.exec(sandbox_id, "ps -eo args")
    assert "sleep 10000" not in ps.stdout and "sleep infinity" in ps.stdout


async def test_huge_output_is_truncated_to_the_cap_keeping_head_and_tail(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    result = await sandbox_client.exec(
        sandbox_id, "echo START; yes | head -c 10000000; echo END", max_output_bytes=4096
    )
    assert result.exit_code == 0 and result.truncated
    assert result.stdout.startswith("START\ny\ny\n") and result.stdout.endswith("y\ny\nEND\n")
    assert "bytes truncated" in result.stdout
    assert len(result.stdout) < 4096 + 100


async def test_files_round_trip_with_mode_and_read_is_capped(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    payload = bytes(range(256)) * 40
    await sandbox_client.write_file(sandbox_id, "/work/sub/dir/blob.bin", payload, mode=0o600)
    assert await sandbox_client.read_file(sandbox_id, "/work/sub/dir/blob.bin") == payload
    assert await sandbox_client.read_file(sandbox_id, "/work/sub/dir/blob.bin", max_bytes=10) == payload[:10]
    mode = await sandbox_client.exec(sandbox_id, "stat -c %a sub/dir/blob.bin")
    assert mode.stdout == "600\n"
    with pytest.raises(SandboxBadRequest, match="no such regular file"):
        await sandbox_client.read_file(sandbox_id, "/work/missing")


async def test_memory_hog_is_reported_oom_killed(sandbox_client: SandboxClient) -> None:
    created = await sandbox_client.create(memory_mb=48)
    # tail buffers a newline-free stream whole, so it outgrows the memory limit and is OOM-killed.
    result = await sandbox_client.exec(created.sandbox_id, "head -c 400m /dev/zero | tail -n 1")
    assert result.exit_code == 137 and result.oom_killed and not result.timed_out
    assert (await sandbox_client.exec(created.sandbox_id, "echo alive")).stdout == "alive\n"
    await sandbox_client.close(created.sandbox_id)


async def test_close_is_idempotent_and_exec_after_close_raises_not_found(
    sandbox_client: SandboxClient,
) -> None:
    created = await sandbox_client.create()
    await sandbox_client.close(created.sandbox_id)
    await sandbox_client.close(created.sandbox_id)
    with pytest.raises(SandboxNotFound) as err:
        await sandbox_client.exec(created.sandbox_id, "echo hi")
    assert err.value.sandbox_id == created.sandbox_id


async def test_exec_in_a_container_killed_behind_sandboxd_raises_not_found(
    sandbox_client: SandboxClient,
) -> None:
    created = await sandbox_client.create()
    async with aiodocker.Docker() as docker:
        await docker.containers.container(created.container).kill()
    with pytest.raises(SandboxNotFound, match="exited"):
        await sandbox_client.exec(created.sandbox_id, "echo hi")
    await sandbox_client.close(created.sandbox_id)


async def test_creating_past_max_sandboxes_raises_capacity(sandbox_client: SandboxClient) -> None:
    ids = [(await sandbox_client.create()).sandbox_id for _ in range(3)]  # the test daemon holds 3
    with pytest.raises(SandboxCapacity):
        await sandbox_client.create()
    await sandbox_client.close(ids[0])
    ids[0] = (await sandbox_client.create()).sandbox_id  # a slot freed by close is usable again
    for sandbox_id in ids:
        await sandbox_client.close(sandbox_id)


async def test_unknown_environment_and_missing_image_are_clear_errors(sandbox_client: SandboxClient) -> None:
    with pytest.raises(SandboxBadRequest, match="unknown environment 'nope'"):
        await sandbox_client.create("nope")
    with pytest.raises(SandboxStartupFailed, match="not present"):
        await sandbox_client.create(image="rollstream-env/none:000000000000")


async def test_sandbox_past_its_ttl_is_reaped_unless_kept_alive(
    sandbox_client: SandboxClient, sandboxd_owner: str
) -> None:
    expiring = await sandbox_client.create(ttl_s=1.5)
    kept = await sandbox_client.create(ttl_s=3)
    for _ in range(6):  # 3 s: twice the expiring one's ttl, and the kept one's original ttl
        await anyio.sleep(0.5)
        await sandbox_client.keepalive(kept.sandbox_id, ttl_s=3)
    with pytest.raises(SandboxNotFound):
        await sandbox_client.exec(expiring.sandbox_id, "true")
    assert (await sandbox_client.exec(kept.sandbox_id, "echo up")).stdout == "up\n"
    assert len(await containers_of(sandboxd_owner)) == 1
    await sandbox_client.close(kept.sandbox_id)


class _NoSandboxes:
    def expiry_of(self, container_id: str) -> float | None:
        return None

    def forget(self, container_id: str) -> None:
        pass


async def test_reaper_removes_a_container_whose_owner_is_dead(nc: NATS, base_image: str) -> None:
    settings = settings_for_tests(nc)
    async with DockerOps() as ops:
        config = container_config(
            CreateRequest(),
            image=base_image,
            owner="sbx-dead00",
            expires=time.time() + 900,
            settings=settings,
        )
        container_id = await ops.create(config)
        removed = await reap_once(
            ops, nc, _NoSandboxes(), owner="sbx-reaper", scope=settings.scope, ping_timeout_s=0.5
        )
    assert container_id in removed
    assert not await container_exists(container_id)


async def test_reaper_removes_long_expired_orphans_of_other_scopes_and_spares_fresh_ones(
    nc: NATS, base_image: str
) -> None:
    settings = settings_for_tests(nc)
    orphan_scope = msgspec.structs.replace(settings, scope=f"{settings.scope}-orphaned")
    async with DockerOps() as ops:
        ids = [
            await ops.create(
                container_config(
                    CreateRequest(),
                    image=base_image,
                    owner="sbx-gone00",
                    expires=expires,
                    settings=orphan_scope,
                )
            )
            for expires in (time.time() - ORPHAN_GRACE_S - 60, time.time() + 900)
        ]
        removed = await reap_once(
            ops, nc, _NoSandboxes(), owner="sbx-reaper", scope=settings.scope, ping_timeout_s=0.5
        )
        stale, fresh = ids
        assert stale in removed and fresh not in removed
        assert not await container_exists(stale)
        assert await container_exists(fresh)
        await ops.remove(fresh)


async def test_reaper_spares_containers_of_a_live_owner(nc: NATS, sandbox_client: SandboxClient) -> None:
    created = await sandbox_client.create()
    async with DockerOps() as ops:
        removed = await reap_once(
            ops, nc, _NoSandboxes(), owner="sbx-other1", scope=settings_for_tests(nc).scope, ping_timeout_s=2
        )
    assert removed == []
    assert (await sandbox_client.exec(created.sandbox_id, "echo still")).stdout == "still\n"
    await sandbox_client.close(created.sandbox_id)


async def test_cancelled_daemon_leaves_no_container_of_its_owner(nc: NATS, base_image: str) -> None:
    async with running_sandboxd(nc, settings_for_tests(nc, max_sandboxes=5)) as owner:
        client = SandboxClient(nc)
        for _ in range(3):
            await client.create()
        assert len(await containers_of(owner)) == 3
    assert await containers_of(owner) == []
