"""Red team, part 1: hostile agent commands against a real sandbox (real sandboxd, Docker, NATS).

The attacker controls only the command strings it sends. Each case asserts the concrete
containment (a process gone, a limit hit, an errno, a size bound) AND that sandboxd reported what
happened clearly. Part 2 (``test_redteam_reward.py``) attacks the reward and the sandbox API.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import AsyncIterator

import aiodocker
import anyio
import psutil
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
from schemas.sandbox import Created
from tests.sandbox_fixtures import driver_pids, root_exec

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
# The agent's processes besides its shells and this probe's own (ps, grep, wc).
AGENT_PROCS = "ps -u agent -o args= | grep -v -e '^ps ' -e '^bash --noprofile' -e '^grep ' -e '^wc '"


@pytest.fixture
async def small_sandbox(sandbox_client: SandboxClient) -> AsyncIterator[str]:
    """A sandbox with tight limits: 96 MiB of memory, 64 processes."""
    created = await sandbox_client.create(memory_mb=96, pids=64)
    yield created.sandbox_id
    with anyio.move_on_after(30, shield=True):
        await sandbox_client.close(created.sandbox_id)


@pytest.fixture
async def created(sandbox_client: SandboxClient) -> AsyncIterator[Created]:
    """A fresh base sandbox (with its container name), closed after the test."""
    c = await sandbox_client.create()
    yield c
    with anyio.move_on_after(30, shield=True):
        await sandbox_client.close(c.sandbox_id)


async def run(client: SandboxClient, sandbox_id: str, command: str, **kw: float) -> tuple[int, str, str]:
    r = await client.exec(sandbox_id, command, **kw)  # type: ignore[arg-type]
    return r.exit_code, r.stdout, r.stderr


async def test_network_egress_fails_with_no_route_no_interface_but_loopback_and_no_vsock(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    # No packet can leave: the only interface is lo and the routing table is empty.
    code, _, err = await run(sandbox_client, sandbox_id, "exec 3<>/dev/tcp/1.1.1.1/443")
    assert code != 0 and "Network is unreachable" in err
    routes = await sandbox_client.exec(sandbox_id, "tail -n +2 /proc/net/route | wc -l")
    assert routes.stdout.strip() == "0"
    ifaces = await sandbox_client.exec(sandbox_id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert ifaces.stdout.split() == ["lo"]
    # AF_VSOCK (40) would reach the hypervisor past network mode none: seccomp refuses the socket.
    vsock = await sandbox_client.exec(sandbox_id, "perl -e 'socket(S, 40, 1, 0) or die qq($!\\n)'")
    assert vsock.exit_code != 0 and "Operation not permitted" in vsock.stderr


async def test_fork_bomb_stops_at_the_pids_limit_and_every_bomb_process_is_killed(
    sandbox_client: SandboxClient, small_sandbox: str
) -> None:
    bomb = await sandbox_client.exec(small_sandbox, "b() { b | b & }; b; sleep 30", timeout_s=4)
    assert bomb.timed_out and bomb.exit_code == 137
    limits = await sandbox_client.exec(
        small_sandbox, "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids/pids.events"
    )
    pids_max, events = limits.stdout.split("\n", 1)
    assert pids_max == "64" and int(re.search(r"max (\d+)", events).group(1)) > 0  # type: ignore[union-attr]
    after = await sandbox_client.exec(small_sandbox, f"echo alive; {AGENT_PROCS} | wc -l")
    assert after.stdout.split() == ["alive", "0"]  # every bomb process is gone


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


ESCAPEES = (
    "sleep 100001 & (sleep 100002 &); nohup sleep 100003 >/dev/null 2>&1 &"
    " setsid sleep 100004 & env -i /bin/sleep 100005 & (env -u HOME setsid sleep 100006 &) &"
    " perl -e 'setpgrp(0, 0); fork and exit; POSIX::setsid() if require POSIX; exec q(sleep), 100007' &"
    " (exec -a innocent sleep 100008 &); disown -a; sleep 100000"
)


async def test_a_timeout_kills_every_escapee_setsid_nohup_double_fork_cleared_env_new_group(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    result = await sandbox_client.exec(sandbox_id, ESCAPEES, timeout_s=1.5)
    assert result.timed_out and result.exit_code == 137
    left = await sandbox_client.exec(sandbox_id, f"{AGENT_PROCS}; ps -eo args | grep -c '^sleep 1000'")
    assert left.stdout == "0\n"  # none of the nine sleeps, under any name or group, survived


async def test_a_session_timeout_kills_the_escapees_and_the_session_keeps_its_state(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    await sandbox_client.session_run(sandbox_id, session, "cd /tmp && export KEPT=yes")
    result = await sandbox_client.session_run(sandbox_id, session, ESCAPEES, timeout_s=1.5)
    assert result.timed_out and result.exit_code == 137
    after = await sandbox_client.session_run(sandbox_id, session, f'{AGENT_PROCS} | wc -l; pwd; echo "$KEPT"')
    assert after.stdout.split() == ["0", "/tmp", "yes"]


async def test_a_timeout_on_the_docker_exec_path_kills_by_uid_too(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    results = {}

    async def busy() -> None:  # holds the exec session, so the next exec goes through docker exec
        results["busy"] = await sandbox_client.exec(sandbox_id, "sleep 60; echo done", timeout_s=120)

    async with anyio.create_task_group() as tg:
        tg.start_soon(busy)
        await anyio.sleep(0.5)
        results["escape"] = await sandbox_client.exec(sandbox_id, ESCAPEES, timeout_s=1.5)
    assert results["escape"].timed_out
    # a timeout ends every agent process of the sandbox: the concurrent command too
    busy = results["busy"]
    assert busy.exit_code == 137 and busy.stdout == "" and busy.duration_ms < 50_000
    left = await sandbox_client.exec(sandbox_id, f"{AGENT_PROCS} | wc -l")
    assert left.stdout == "0\n"


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


async def test_the_agent_runs_as_an_unprivileged_uid_with_no_capability_at_all(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    status = await sandbox_client.exec(
        sandbox_id, "id -un; grep -E '^(Uid|Cap(Inh|Eff|Prm|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    user, *lines = status.stdout.splitlines()
    fields = dict(line.split(":\t") for line in lines)
    assert user == "agent" and fields["Uid"].split() == ["1000"] * 4
    assert {k: v for k, v in fields.items() if k.startswith("Cap")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000"
    )
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    files = await sandbox_client.exec(sandbox_id, "touch /work/x && stat -c %U /work/x /work && ls /root")
    assert files.stdout.split() == ["agent", "agent"] and "Permission denied" in files.stderr


async def test_setuid_binaries_su_mount_and_chown_do_not_escalate_from_the_agent_uid(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    found = await sandbox_client.exec(sandbox_id, "find / -xdev -perm -4000 -type f 2>/dev/null | sort")
    setuid = found.stdout.split()
    assert "/usr/bin/su" in setuid and "/usr/bin/mount" in setuid  # there, but no-new-privileges
    for binary in setuid:  # each runs with the caller's uid and no capability
        probe = await sandbox_client.exec(sandbox_id, f"{binary} --help >/dev/null 2>&1; id -u")
        assert probe.stdout == "1000\n"
    su = await sandbox_client.exec(sandbox_id, "echo x | su -c 'id -u' root")
    assert su.exit_code != 0 and su.stdout == ""
    mount = await sandbox_client.exec(sandbox_id, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m")
    assert mount.exit_code != 0 and "must be superuser" in mount.stderr + mount.stdout
    copied = await sandbox_client.exec(
        sandbox_id,
        "cp /bin/bash /work/sh && chmod u+s /work/sh"
        " && /work/sh -p -c 'id -u; grep CapEff /proc/self/status'",
    )
    assert copied.stdout.split() == ["1000", "CapEff:", "0000000000000000"]
    chown = await sandbox_client.exec(sandbox_id, "touch /work/y && chown 0 /work/y")
    assert chown.exit_code != 0 and "Operation not permitted" in chown.stderr
    rootfs = await sandbox_client.exec(sandbox_id, "echo x >> /etc/passwd")
    assert rootfs.exit_code != 0


SECCOMP_PROBE = (
    "perl -e 'for (@ARGV) { my ($n, $nr) = split /=/; $! = 0; syscall($nr, 0, 0, 0, 0, 0); "
    "print qq($n=), $! + 0, qq(\\n) }' "
)
X86_64 = {
    "io_uring_setup": 425,
    "keyctl": 250,
    "add_key": 248,
    "bpf": 321,
    "userfaultfd": 323,
    "perf_event_open": 298,
    "mount": 165,
    "umount2": 166,
    "unshare": 272,
    "setns": 308,
    "pivot_root": 155,
    "open_by_handle_at": 304,
    "kexec_load": 246,
    "init_module": 175,
    "clone3": 435,
    "not_a_syscall": 999,
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers of x86_64")
async def test_seccomp_refuses_io_uring_keyctl_bpf_userfaultfd_perf_mount_and_namespaces(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    probe = await sandbox_client.exec(
        sandbox_id, SECCOMP_PROBE + " ".join(f"{k}={v}" for k, v in X86_64.items())
    )
    errno = {k: int(v) for k, v in (line.split("=") for line in probe.stdout.split())}
    eperm, enosys = 1, 38
    assert {k: v for k, v in errno.items() if k not in ("clone3", "not_a_syscall")} == dict.fromkeys(
        set(X86_64) - {"clone3", "not_a_syscall"}, eperm
    )
    assert errno["clone3"] == enosys and errno["not_a_syscall"] == enosys  # libc falls back to clone
    userns = await sandbox_client.exec(sandbox_id, "unshare -Ur id")
    assert userns.exit_code != 0 and "Operation not permitted" in userns.stderr
    threads = await sandbox_client.exec(
        sandbox_id, "(sleep 0.1 &); echo forks"
    )  # clone without new namespaces
    assert threads.stdout == "forks\n"


async def test_the_agent_cannot_trace_signal_or_open_the_root_driver_or_init(
    sandbox_client: SandboxClient, created: Created
) -> None:
    sid = created.sandbox_id
    await sandbox_client.exec(sid, "true")  # opens the exec session
    [driver] = await driver_pids(created.container)
    attack = await sandbox_client.exec(
        sid,
        f"kill -STOP {driver}; kill -0 1; cat /proc/{driver}/environ; ls /proc/{driver}/fd;"
        f" echo forged > /proc/{driver}/fd/1; echo forged > /proc/1/fd/1;"
        f" perl -e 'syscall(101, 16, {driver}, 0, 0); print $! + 0'",
    )
    assert attack.stderr.count("Operation not permitted") == 2  # both signals
    assert attack.stderr.count("Permission denied") == 4  # environ, fd list, both fd writes
    assert attack.stdout == "1"  # PTRACE_ATTACH: EPERM
    assert (await sandbox_client.exec(sid, "echo still")).stdout == "still\n"
    assert await driver_pids(created.container) == [driver]


async def test_writes_to_the_container_log_neither_reach_nor_grow_a_host_file(
    sandbox_client: SandboxClient, created: Created
) -> None:
    agent = await sandbox_client.exec(created.sandbox_id, "head -c 10m /dev/zero > /proc/1/fd/1")
    assert agent.exit_code != 0 and "Permission denied" in agent.stderr
    code, _ = await root_exec(created.container, "head -c 10485760 /dev/zero > /proc/1/fd/1")
    assert code == 0  # even root's writes (the host's view) go nowhere:
    async with aiodocker.Docker() as docker:
        info = await docker.containers.get(created.container)
        assert info["HostConfig"]["LogConfig"]["Type"] == "none" and info["LogPath"] == ""
        with pytest.raises(aiodocker.DockerError, match="does not support reading"):
            await info.log(stdout=True)


async def test_a_crashing_process_leaves_no_core_dump(sandbox_client: SandboxClient, sandbox_id: str) -> None:
    crash = await sandbox_client.exec(
        sandbox_id, "ulimit -c; ulimit -Hc; cd /work && bash -c 'kill -SEGV $$'; ls /work"
    )
    assert crash.stdout.split() == ["0", "0"]  # the limit, its ceiling, and no core file


async def test_a_thousand_commands_leave_no_zombies(sandbox_client: SandboxClient, sandbox_id: str) -> None:
    count_zombies = "cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l"
    session = await sandbox_client.session_open(sandbox_id)
    assert (await sandbox_client.session_run(sandbox_id, session, count_zombies)).stdout == "0\n"
    for i in range(1000):  # each leaves an orphan behind, which init must reap
        result = await sandbox_client.session_run(sandbox_id, session, f"true & echo {i}")
        assert result.stdout == f"{i}\n"
    await anyio.sleep(0.2)
    assert (await sandbox_client.session_run(sandbox_id, session, count_zombies)).stdout == "0\n"
    procs = await sandbox_client.session_run(sandbox_id, session, f"{AGENT_PROCS} | wc -l")
    assert procs.stdout == "0\n"


async def test_one_sandbox_sees_neither_the_files_nor_the_processes_of_another(
    nc: NATS, sandbox_client: SandboxClient
) -> None:
    a, b = await sandbox_client.create(), await sandbox_client.create()
    try:
        await sandbox_client.exec(b.sandbox_id, "echo secret-of-b > /work/secret; sleep 60 & echo started")
        look = await sandbox_client.exec(
            a.sandbox_id,
            "cat /proc/[0-9]*/root/work/secret; ls /work; grep -rl secret-of-b /tmp /dev/shm /work;"
            " ps -eo args | grep -c '^[s]leep 60'",
        )
        assert "secret-of-b" not in look.stdout and look.stdout.split() == ["0"]
        whose = SandboxClient(nc)  # knowing b's id is not enough: no token
        with pytest.raises(Exception, match="capability token"):
            await whose.read_file(b.sandbox_id, "/work/secret")
    finally:
        await sandbox_client.close(a.sandbox_id)
        await sandbox_client.close(b.sandbox_id)
