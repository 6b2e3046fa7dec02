"""Red team: hostile commands against a real sandbox. Each case asserts that the sandbox contained
the attack AND that sandboxd reported what happened clearly (flags, exit codes, messages)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

import anyio
import psutil
import pytest

from sandboxd.client import SandboxClient

pytestmark = pytest.mark.docker

MIB = 1024 * 1024


@pytest.fixture
async def small_sandbox(sandbox_client: SandboxClient) -> AsyncIterator[str]:
    """A sandbox with tight limits: 96 MiB of memory, 64 processes."""
    created = await sandbox_client.create(memory_mb=96, pids=64)
    yield created.sandbox_id
    with anyio.move_on_after(30, shield=True):
        await sandbox_client.close(created.sandbox_id)


async def run(client: SandboxClient, sandbox_id: str, command: str, **kw: float) -> tuple[int, str, str]:
    r = await client.exec(sandbox_id, command, **kw)  # type: ignore[arg-type]
    return r.exit_code, r.stdout, r.stderr


async def test_network_egress_fails_with_no_route_and_no_interface_but_loopback(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    # No packet can leave: the only interface is lo and the routing table is empty.
    code, _, err = await run(sandbox_client, sandbox_id, "exec 3<>/dev/tcp/1.1.1.1/443")
    assert code != 0 and "Network is unreachable" in err
    routes = await sandbox_client.exec(sandbox_id, "tail -n +2 /proc/net/route | wc -l")
    assert routes.stdout.strip() == "0"
    ifaces = await sandbox_client.exec(sandbox_id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert ifaces.stdout.split() == ["lo"]


async def test_fork_bomb_stops_at_the_pids_limit_and_the_sandbox_recovers(
    sandbox_client: SandboxClient, small_sandbox: str
) -> None:
    bomb = await sandbox_client.exec(small_sandbox, "b() { b | b & }; b; sleep 30", timeout_s=4)
    assert bomb.timed_out and bomb.exit_code == 137
    limits = await sandbox_client.exec(
        small_sandbox, "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids/pids.events"
    )
    pids_max, events = limits.stdout.split("\n", 1)
    assert pids_max == "64" and int(re.search(r"max (\d+)", events).group(1)) > 0  # type: ignore[union-attr]
    after = await sandbox_client.exec(small_sandbox, "echo alive; ls -d /proc/[0-9]* | wc -l")
    alive, nprocs = after.stdout.split()
    assert alive == "alive" and int(nprocs) < 10  # every bomb process is gone


async def test_memory_bomb_is_oom_killed_and_reported_as_such(
    sandbox_client: SandboxClient, small_sandbox: str
) -> None:
    bomb = await sandbox_client.exec(small_sandbox, "perl -e '$x = q(a) x (400 << 20); print length $x'")
    assert bomb.oom_killed and bomb.exit_code == 137 and not bomb.timed_out and bomb.stdout == ""
    assert (await sandbox_client.exec(small_sandbox, "echo alive")).stdout == "alive\n"
    calm = await sandbox_client.exec(small_sandbox, "kill -9 $BASHPID")  # 137 without any OOM
    assert calm.exit_code == 137 and not calm.oom_killed


async def test_filling_the_scratch_space_fails_with_enospc_and_the_sandbox_stays_usable(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    # One mount at a time: tmpfs pages count against the sandbox's memory limit.
    for mount in ("/work", "/tmp", "/dev/shm"):
        fill = await sandbox_client.exec(sandbox_id, f"head -c 400m /dev/zero > {mount}/fill", timeout_s=30)
        assert fill.exit_code != 0 and "No space left on device" in fill.stderr and not fill.oom_killed
        full = await sandbox_client.exec(
            sandbox_id, f"df --output=pcent {mount} | tail -n 1; echo ok > /work/f"
        )
        assert full.stdout.split() == ["100%"]  # and commands still run while it is full
        cleanup = await sandbox_client.exec(
            sandbox_id, f"rm {mount}/fill && echo ok > /work/f && cat /work/f"
        )
        assert (cleanup.exit_code, cleanup.stdout) == (0, "ok\n")


async def test_endless_and_huge_output_is_truncated_with_bounded_daemon_memory(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    daemon = psutil.Process(os.getpid())  # the fixture runs sandboxd in this process
    await sandbox_client.exec(sandbox_id, "true")
    rss_before = daemon.memory_info().rss
    yes = await sandbox_client.exec(sandbox_id, "yes", timeout_s=3, max_output_bytes=4096)
    assert yes.timed_out and yes.truncated and yes.stdout.startswith("y\ny\n") and len(yes.stdout) < 4200
    line = await sandbox_client.exec(
        sandbox_id, "head -c 1000000000 /dev/zero | tr '\\0' x; echo; echo END", timeout_s=60
    )
    assert line.exit_code == 0 and line.truncated and not line.timed_out
    assert line.stdout.startswith("xxxx") and line.stdout.endswith("xxx\nEND\n")
    dropped = int(re.search(r"\[\.\.\. (\d+) bytes truncated", line.stdout).group(1))  # type: ignore[union-attr]
    assert dropped == 1_000_000_005 - 16384
    assert daemon.memory_info().rss - rss_before < 50 * MIB


async def test_sleep_past_its_timeout_is_killed_with_its_whole_process_tree(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    baseline = await sandbox_client.exec(sandbox_id, "ls -d /proc/[0-9]* | wc -l")
    tree = (
        "sleep 100001 & (sleep 100002 &); nohup sleep 100003 >/dev/null 2>&1 &"
        " setsid sleep 100004 & sleep 100000"
    )
    result = await sandbox_client.exec(sandbox_id, tree, timeout_s=1)
    assert result.timed_out and result.exit_code == 137
    ps = await sandbox_client.exec(sandbox_id, "ps -eo args")
    assert "sleep 1000" not in ps.stdout
    after = await sandbox_client.exec(sandbox_id, "ls -d /proc/[0-9]* | wc -l")
    assert after.stdout == baseline.stdout


async def test_no_docker_socket_no_host_processes_and_only_image_and_tmpfs_mounts(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    sock = await sandbox_client.exec(sandbox_id, "ls /var/run/docker.sock /run/docker.sock")
    assert sock.exit_code != 0 and "No such file or directory" in sock.stderr
    init = await sandbox_client.exec(sandbox_id, "tr '\\0' ' ' < /proc/1/cmdline; echo; ps -eo comm")
    assert init.stdout.startswith("/sbin/docker-init -- sleep infinity")
    assert not {"dockerd", "containerd", "systemd", "sshd"} & set(init.stdout.split())
    mounts = (await sandbox_client.exec(sandbox_id, "cat /proc/self/mountinfo")).stdout.splitlines()
    for line in mounts:
        fields = line.split()
        point, options, fstype = fields[4], fields[5].split(","), fields[fields.index("-") + 1]
        if point == "/":
            assert fstype == "overlay" and "ro" in options  # the image, read-only
        elif fstype not in ("tmpfs", "proc", "sysfs", "cgroup", "devpts", "mqueue"):
            # Docker's own per-container files (hosts, resolv.conf, its init): read-only.
            assert "ro" in options, line
            assert point in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/usr/sbin/docker-init"), line
    writable = {f.split()[4] for f in mounts if "rw" in f.split()[5].split(",") and " - tmpfs " in f}
    assert {"/work", "/tmp"} <= writable


async def test_privilege_escalation_fails_every_way(sandbox_client: SandboxClient, sandbox_id: str) -> None:
    status = await sandbox_client.exec(
        sandbox_id, "grep -E '^(Cap(Eff|Prm|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    fields = dict(line.split(":\t") for line in status.stdout.splitlines())
    assert {k: v for k, v in fields.items() if k.startswith("Cap")} == dict.fromkeys(
        ("CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000"
    )
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    mount = await sandbox_client.exec(sandbox_id, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")
    assert mount.exit_code != 0 and "permission denied" in mount.stderr.lower()
    userns = await sandbox_client.exec(sandbox_id, "unshare -Ur id")
    assert userns.exit_code != 0 and "Operation not permitted" in userns.stderr
    raw = await sandbox_client.exec(
        sandbox_id, "perl -MSocket -e 'socket(S, PF_INET, SOCK_RAW, 1) or die qq($!\\n)'"
    )
    assert raw.exit_code != 0 and "Operation not permitted" in raw.stderr
    setuid = await sandbox_client.exec(
        sandbox_id,
        "cp /bin/bash /work/sh && chmod u+s /work/sh && /work/sh -p -c 'grep CapEff /proc/self/status'",
    )
    assert setuid.stdout.split() == ["CapEff:", "0000000000000000"]  # nosuid mount + no-new-privileges
    chown = await sandbox_client.exec(sandbox_id, "touch /work/x && chown 1000 /work/x")
    assert chown.exit_code != 0 and "Operation not permitted" in chown.stderr  # no CAP_CHOWN


async def test_a_thousand_commands_leave_no_zombies(sandbox_client: SandboxClient, sandbox_id: str) -> None:
    count_zombies = "cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l"
    session = await sandbox_client.session_open(sandbox_id)
    assert (await sandbox_client.session_run(sandbox_id, session, count_zombies)).stdout == "0\n"
    for i in range(1000):  # each leaves an orphan behind, which init must reap
        result = await sandbox_client.session_run(sandbox_id, session, f"true & echo {i}")
        assert result.stdout == f"{i}\n"
    await anyio.sleep(0.2)
    assert (await sandbox_client.session_run(sandbox_id, session, count_zombies)).stdout == "0\n"
    procs = await sandbox_client.session_run(sandbox_id, session, "ls -d /proc/[0-9]* | wc -l")
    assert int(procs.stdout) < 10
