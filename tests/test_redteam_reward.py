"""Red team, part 2: attacks on the reward and on the sandbox API (real sandboxd, Docker, NATS).

The attacker sends command strings (the agent) and any request the rollout role's broker
credentials allow (which includes any sandbox request but ``verify``: see test_security.py). Each
case asserts the concrete containment: reward 0, a request refused with a clear error, memory and
logs bounded, nothing removed that should live.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import aiodocker
import anyio
import msgspec
import psutil
import pytest
import structlog
from nats.aio.client import Client as NATS

from consumers.reward import score
from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps
from sandboxd.errors import SandboxBadRequest, SandboxError, SandboxForbidden, SandboxStartupFailed
from sandboxd.reaper import reap_once
from schemas.sandbox import (
    CloseRequest,
    Created,
    CreateRequest,
    ExecRequest,
    SandboxFault,
    SandboxRequest,
    SessionOpenRequest,
    VerifyRequest,
    reply_decoder,
)
from schemas.task import Task
from schemas.trajectory import Trajectory
from tests.sandbox_fixtures import driver_pids, root_exec, running_sandboxd, settings_for_tests

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
# Fails unless /work/answer holds 42. The planted process waits for a `sleep 0.5` (the check's
# first step) to appear anywhere in the sandbox, then writes the answer the check wants.
CHECK = 'sleep 0.5; test "$(cat /work/answer)" = 42'
WATCHER = b"""while :; do
  for f in /proc/[0-9]*/cmdline; do
    a=(); while IFS= read -r -d '' x; do a+=("$x"); done < "$f" 2>/dev/null
    [ "${a[0]}" = sleep ] && [ "${a[1]}" = 0.5 ] && echo 42 > /work/answer
  done
  sleep 0.02
done
"""
PLANT = "echo wrong > /work/answer; nohup setsid bash /work/.w >/dev/null 2>&1 & echo planted"


@pytest.fixture
async def created(sandbox_client: SandboxClient) -> AsyncIterator[Created]:
    c = await sandbox_client.create()
    yield c
    with anyio.move_on_after(30, shield=True):
        await sandbox_client.close(c.sandbox_id)


def trajectory(sandbox_id: str, verify: list[str]) -> Trajectory:
    task = Task(task_id="rt", family="redteam", instruction="x", verify=verify)
    return Trajectory(
        traj_id="rt:rt:0",
        run="rt",
        task_id="rt",
        family="redteam",
        group_id="rt:rt",
        sample_idx=0,
        prompt_tokens=b"",
        chunks=[],
        status="completed",
        min_version=0,
        max_version=0,
        sandbox_id=sandbox_id,
        task=task,
    )


async def request(nc: NATS, subject: str, req: SandboxRequest) -> object:
    msg = await nc.request(subject, msgspec.msgpack.encode(req), timeout=30)
    return reply_decoder.decode(msg.data)


# -- the reward cannot be forged -------------------------------------------------------------------


async def test_a_planted_process_that_forges_the_check_scores_zero_through_verify(
    nc: NATS, sandbox_client: SandboxClient
) -> None:
    control, attacked = await sandbox_client.create(), await sandbox_client.create()
    for c in (control, attacked):
        await sandbox_client.write_file(c.sandbox_id, "/work/.w", WATCHER)
        assert (await sandbox_client.exec(c.sandbox_id, PLANT)).stdout == "planted\n"
        assert (await sandbox_client.exec(c.sandbox_id, "cat /work/answer")).stdout == "wrong\n"
    # Control: run as an agent command (the old verify path), the planted process forges the check.
    forged = await sandbox_client.exec(control.sandbox_id, CHECK)
    assert forged.exit_code == 0
    await sandbox_client.close(control.sandbox_id)
    # Through the reward group (a client without any token): the agent is ended first, reward 0.
    scored = await score(trajectory(attacked.sandbox_id, [CHECK]), SandboxClient(nc), 10.0)
    assert scored.valid and scored.reward == 0.0 and "[1]" in scored.verifier_output
    with pytest.raises(SandboxError):  # verify removed the sandbox
        await sandbox_client.exec(attacked.sandbox_id, "true")


async def test_forged_frames_from_the_agent_reach_nothing_and_the_failing_check_scores_zero(
    nc: NATS, sandbox_client: SandboxClient, created: Created
) -> None:
    sid = created.sandbox_id
    await sandbox_client.exec(sid, "true")
    [driver] = await driver_pids(created.container)
    forge = "x 0 12 00000000000000000000000000000000\nt 0 0 0 0 -1 1 0"  # a result frame, unauthenticated
    attack = await sandbox_client.exec(
        sid,
        f"printf '{forge}' > /proc/{driver}/fd/1; printf '{forge}' > /proc/1/fd/1;"
        f" nohup sh -c 'while :; do printf \"{forge}\" > /proc/{driver}/fd/1; sleep 0.01; done'"
        " >/dev/null 2>&1 &"
        " echo wrong > /work/answer",
    )
    assert attack.stderr.count("Permission denied") == 2
    scored = await score(trajectory(sid, ['test "$(cat /work/answer)" = 42']), SandboxClient(nc), 10.0)
    assert scored.valid and scored.reward == 0.0


async def test_forged_status_lines_in_its_own_shell_never_answer_a_later_command(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    # The shell's status pipe (its fd 3) is the agent's own: it can write to it, as to any of its fds.
    hijack = await sandbox_client.exec(
        sandbox_id,
        "p=$BASHPID; shell=$(cut -d' ' -f4 /proc/$p/stat);"
        " for i in $(seq 50); do printf 'X %s 0\\nP %s 1\\n' $RANDOM$i $i > /proc/$shell/fd/3; done;"
        " (while :; do printf 'X 0000 0\\n' > /proc/$shell/fd/3 2>/dev/null; sleep 0.01; done &); echo done",
    )
    assert hijack.stdout == "done\n"
    for code in (3, 5, 0, 7):  # the queued forgeries answer none of the later commands
        result = await sandbox_client.exec(sandbox_id, f"sleep 0.05; exit {code}")
        assert result.exit_code == code and not result.timed_out


async def _inject_during_a_command(
    sandbox_client: SandboxClient, created: Created, command: str, injection: str
) -> list[BaseException]:
    """Run ``command`` in the sandbox's session and, while it runs, ``injection`` as root in the
    container (``{driver}`` is the session driver's pid); the errors the command raised."""
    sid = created.sandbox_id
    await sandbox_client.exec(sid, "true")
    [driver] = await driver_pids(created.container)
    errors: list[BaseException] = []

    async def victim() -> None:
        try:
            await sandbox_client.exec(sid, command, timeout_s=10)
        except SandboxError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        await anyio.sleep(0.7)
        await root_exec(created.container, injection.format(driver=driver))
    return errors


async def test_a_forged_frame_on_the_driver_channel_is_a_session_error_not_a_result(
    sandbox_client: SandboxClient, created: Created
) -> None:
    # Even a writer that reaches the channel (root in the container: the host's view) cannot forge a
    # result: the frame's MAC is keyed by a secret only sandboxd and the driver hold.
    sid = created.sandbox_id
    forged = "x 0 30 0123456789abcdef0123456789abcdef\\n0000000000000000 0 0 0 0 -1 1 0"
    errors = await _inject_during_a_command(
        sandbox_client, created, "sleep 2; exit 1", f"printf '{forged}' > /proc/{{driver}}/fd/1"
    )
    assert len(errors) == 1 and "protocol violation" in str(errors[0])
    assert (await sandbox_client.exec(sid, "echo fresh")).stdout == "fresh\n"  # a new session serves


async def test_a_frame_claiming_a_huge_length_is_refused_with_bounded_memory(
    sandbox_client: SandboxClient, created: Created
) -> None:
    daemon = psutil.Process(os.getpid())
    rss_before = daemon.memory_info().rss
    huge = "o 1 9999999999 0123456789abcdef0123456789abcdef\\n"
    errors = await _inject_during_a_command(
        sandbox_client,
        created,
        "sleep 2",
        f"{{{{ printf '{huge}'; head -c 8388608 /dev/zero; }}}} > /proc/{{driver}}/fd/1",
    )
    assert len(errors) == 1 and "claims 9999999999 bytes" in str(errors[0])
    assert daemon.memory_info().rss - rss_before < 30 * MIB


async def test_a_driver_stderr_flood_ends_the_session_with_bounded_logs(
    sandbox_client: SandboxClient, created: Created
) -> None:
    sid = created.sandbox_id
    flood = "head -c 4194304 /dev/zero | tr '\\0' E > /proc/{driver}/fd/2"
    with structlog.testing.capture_logs() as logs:
        errors = await _inject_during_a_command(sandbox_client, created, "sleep 2", flood)
    assert len(errors) == 1 and "stderr" in str(errors[0])
    logged = sum(len(e.get("text", "")) for e in logs if e["event"] == "session.driver_stderr")
    assert 0 < logged <= 4096
    assert (await sandbox_client.exec(sid, "echo fresh")).stdout == "fresh\n"


async def test_verify_runs_as_the_verifier_in_a_clean_environment_and_seals_the_sandbox(
    nc: NATS, sandbox_client: SandboxClient
) -> None:
    # BASH_ENV in the agent's environment would make every bash source the agent's script.
    c = await sandbox_client.create(env={"BASH_ENV": "/work/evil.sh"})
    try:
        await sandbox_client.write_file(c.sandbox_id, "/work/evil.sh", b"echo FORGED; exit 0\n")
        agent = await sandbox_client.exec(
            c.sandbox_id, "echo $BASH_ENV; bash -c false; sleep 300 >/dev/null 2>&1 &"
        )
        assert agent.stdout == "/work/evil.sh\nFORGED\n" and agent.exit_code == 0  # the agent's own
        verifier = SandboxClient(nc)
        res = await verifier.verify(
            c.sandbox_id, ['id -un; echo "$HOME"; env | grep -c BASH_ENV || true', "false"], close=False
        )
        assert not res.passed and [r.exit_code for r in res.results] == [0, 1]
        assert res.agent_processes == 1  # the background sleep, killed before the first command
        user, home, bash_env = res.results[0].stdout.split()
        assert user == "rs-verify" and home.startswith("/tmp/.rs-verify.") and bash_env == "0"
        with pytest.raises(SandboxForbidden, match="sealed"):
            await sandbox_client.exec(c.sandbox_id, "echo late")
        with pytest.raises(SandboxForbidden, match="sealed"):
            await sandbox_client.write_file(c.sandbox_id, "/work/answer", b"42")
    finally:
        await sandbox_client.close(c.sandbox_id)


async def test_inspect_sees_the_agents_live_processes_as_root_without_a_token_and_not_after_the_seal(
    nc: NATS, sandbox_client: SandboxClient
) -> None:
    # The reward group's probe channel: root, a fresh docker exec, no token, the agent still running.
    c = await sandbox_client.create(env={"BASH_ENV": "/work/evil.sh"})
    try:
        await sandbox_client.write_file(c.sandbox_id, "/work/evil.sh", b"echo FORGED\n")
        await sandbox_client.exec(c.sandbox_id, "sleep 4242 >/dev/null 2>&1 &")
        judge = SandboxClient(nc)  # holds no token for this sandbox
        seen = await judge.inspect(c.sandbox_id, "id -u; ps -eo user=,args= | grep -c '[s]leep 4242'")
        assert seen.exit_code == 0 and seen.stdout.split() == ["0", "1"], seen
        assert "FORGED" not in seen.stdout + seen.stderr  # none of the agent's environment
        res = await judge.verify(c.sandbox_id, ["true"], close=False)
        assert res.passed and res.agent_processes == 1
        with pytest.raises(SandboxForbidden, match="sealed"):
            await judge.inspect(c.sandbox_id, "true")
    finally:
        await sandbox_client.close(c.sandbox_id)


# -- the API refuses what is not the caller's ------------------------------------------------------


async def test_a_sandbox_is_usable_only_with_its_capability_token(
    nc: NATS, sandbox_client: SandboxClient, created: Created
) -> None:
    sid = created.sandbox_id
    stranger = SandboxClient(nc)  # knows the id (as anyone reading the lake does), not the token
    attempts = [
        stranger.exec(sid, "touch /work/pwned"),
        stranger.write_file(sid, "/work/pwned", b"x"),
        stranger.read_file(sid, "/etc/hostname"),
        stranger.session_open(sid),
        stranger.keepalive(sid, 60),
        stranger.close(sid),
    ]
    for attempt in attempts:
        with pytest.raises(SandboxForbidden, match="capability token"):
            await attempt
    stranger.adopt(sid, created.token[:-1] + ("A" if created.token[-1] != "A" else "B"))
    with pytest.raises(SandboxForbidden):
        await stranger.exec(sid, "touch /work/pwned")
    assert (await sandbox_client.exec(sid, "ls /work; echo alive")).stdout == "alive\n"
    stranger.adopt(sid, created.token)  # handed over explicitly: now it is the holder's
    assert (await stranger.exec(sid, "echo mine")).stdout == "mine\n"


async def test_the_token_is_secret_per_sandbox_and_in_no_container_field(
    sandbox_client: SandboxClient, created: Created
) -> None:
    other = await sandbox_client.create()
    await sandbox_client.close(other.sandbox_id)
    assert created.token != other.token and len(created.token) >= 40
    assert created.token not in created.sandbox_id + created.container
    async with aiodocker.Docker() as docker:
        info = await docker.containers.get(created.container)
    assert created.token not in msgspec.json.encode(info._container).decode()
    assert "token" not in {f.name for f in msgspec.structs.fields(Trajectory)}  # nor in the lake's records
    env = await sandbox_client.exec(created.sandbox_id, "env; cat /proc/1/environ")
    assert created.token not in env.stdout + env.stderr


async def test_an_operation_on_a_subject_of_another_kind_is_refused(
    nc: NATS, sandbox_client: SandboxClient, created: Created, sandboxd_owner: str
) -> None:
    sid, token = created.sandbox_id, created.token
    pwn = ExecRequest(sandbox_id=sid, token=token, command="touch /work/pwned")
    wrong = [
        (f"rs.sandbox.{sandboxd_owner}.session", pwn),
        (f"rs.sandbox.{sandboxd_owner}.close", pwn),
        (f"rs.sandbox.{sandboxd_owner}.exec", VerifyRequest(sandbox_id=sid, commands=["true"])),
        (f"rs.sandbox.{sandboxd_owner}.exec", CloseRequest(sandbox_id=sid, token=token)),
        (f"rs.sandbox.{sandboxd_owner}.verify", SessionOpenRequest(sandbox_id=sid, token=token)),
        (f"rs.sandbox.{sandboxd_owner}.exec", CreateRequest()),
        ("rs.sandbox.create", pwn),
    ]
    for subject, req in wrong:
        reply = await request(nc, subject, req)
        assert isinstance(reply, SandboxFault) and reply.error == "bad_request", (subject, reply)
        assert "does not belong" in reply.message
    assert (await sandbox_client.exec(sid, "ls /work; echo ok")).stdout == "ok\n"  # nothing ran


async def test_environment_names_with_paths_and_foreign_images_are_refused(
    sandbox_client: SandboxClient,
) -> None:
    for name in ("../../etc/passwd", "base/../gem", "/base", "Base", "", "a" * 65, "base\n"):
        with pytest.raises(SandboxBadRequest, match="`environment`"):
            await sandbox_client.create(name)
    for image in (
        "alpine:latest",
        "docker.io/library/debian",
        "rollstream-env/base:latest",
        "rollstream-task:x",
    ):
        with pytest.raises(SandboxBadRequest, match="`image`"):
            await sandbox_client.create(image=image)
    with pytest.raises(SandboxStartupFailed, match="not present"):  # a name rollstream builds: allowed
        await sandbox_client.create(image="rollstream-task:" + "0" * 16)


async def test_huge_create_and_command_parameters_are_refused_naming_the_bound(
    nc: NATS, base_image: str
) -> None:
    async with running_sandboxd(nc, settings_for_tests(nc, max_file_bytes=4096)):
        client = SandboxClient(nc)
        for kw, field in (
            ({"memory_mb": 10**7}, "memory_mb"),
            ({"pids": 10**7}, "pids"),
            ({"cpus": 10000.0}, "cpus"),
            ({"ttl_s": 10.0**9}, "ttl_s"),
            ({"labels": {f"k{i}": "v" for i in range(1000)}}, "labels"),
            ({"env": {"X": "v" * 100_000}}, "env"),
        ):
            with pytest.raises(SandboxBadRequest, match=f"`{field}`"):
                await client.create(**kw)  # type: ignore[arg-type]
        sid = (await client.create()).sandbox_id
        for kw, field in (
            ({"timeout_s": 10.0**7}, "timeout_s"),
            ({"max_output_bytes": 10**9}, "max_output_bytes"),
        ):
            with pytest.raises(SandboxBadRequest, match=f"`{field}`"):
                await client.exec(sid, "true", **kw)  # type: ignore[arg-type]
        with pytest.raises(SandboxBadRequest, match="`command`"):
            await client.exec(sid, "#" * 300_000)
        with pytest.raises(SandboxBadRequest, match=r"`data`.*4096"):
            await client.write_file(sid, "/work/big", b"x" * 5000)
        with pytest.raises(SandboxBadRequest, match="`max_bytes`"):
            await client.read_file(sid, "/work/big", max_bytes=10**10)
        assert (await client.exec(sid, "echo fine")).stdout == "fine\n"
        await client.close(sid)


async def test_path_traversal_in_file_apis_reaches_only_what_the_agent_can(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    for path in ("/work/../etc/passwd", "/work/../../root/x", "/work/../proc/1/environ"):
        with pytest.raises(SandboxBadRequest, match="cannot write"):
            await sandbox_client.write_file(sandbox_id, path, b"pwned")
    for path in ("/etc/shadow", "/work/../proc/1/environ", "/root/.bashrc"):
        with pytest.raises(SandboxBadRequest, match=r"cannot read|no such"):
            await sandbox_client.read_file(sandbox_id, path)
    for path in ("work/x", "../x", "/work/\0x"):
        with pytest.raises(SandboxBadRequest, match="absolute path"):
            await sandbox_client.read_file(sandbox_id, path)
    await sandbox_client.write_file(sandbox_id, "/work/a/../b/c", b"ok")  # normalised, the agent's own
    owner = await sandbox_client.exec(sandbox_id, "stat -c %U /work/b/c; grep -c root /etc/passwd")
    assert owner.stdout.split() == ["agent", "1"]


async def test_a_busy_instance_still_answers_pings_and_its_sandboxes_are_never_reaped(
    nc: NATS, base_image: str
) -> None:
    settings = settings_for_tests(nc, max_concurrent_requests=2)
    async with running_sandboxd(nc, settings) as owner, DockerOps() as ops:
        client = SandboxClient(nc, request_timeout_s=60)
        created = await client.create()
        async with anyio.create_task_group() as tg:
            for _ in range(5):  # two hold the request slots for 3 s, three wait behind them
                tg.start_soon(lambda: client.exec(created.sandbox_id, "sleep 3", timeout_s=20))
            await anyio.sleep(0.5)
            started = time.monotonic()
            await nc.request(f"rs.sandbox.{owner}.ping", b"", timeout=0.5)
            assert time.monotonic() - started < 0.5
            removed = await reap_once(
                ops, nc, _NoSandboxes(), owner="sbx-second", scope=settings.scope, ping_timeout_s=0.5
            )
            assert removed == []
        assert (await client.exec(created.sandbox_id, "echo alive")).stdout == "alive\n"
        await client.close(created.sandbox_id)


class _NoSandboxes:
    """The registry of a second instance that holds nothing of its own."""

    def expiry_of(self, container_id: str) -> float | None:
        return None

    def forget(self, container_id: str) -> None:
        pass
