"""Persistent sessions and the warm pool of sandboxd (real nats-server, real Docker)."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client as NATS

from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps
from sandboxd.errors import SandboxBadRequest, SandboxCapacity, SandboxNotFound
from tests.factories import containers_of, running_sandboxd, settings_for_tests

pytestmark = pytest.mark.docker


async def test_session_keeps_cwd_and_exports_while_exec_starts_fresh(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    await sandbox_client.session_run(sandbox_id, session, "mkdir -p sub && cd sub && export GREETING=hi")
    result = await sandbox_client.session_run(sandbox_id, session, 'pwd; echo "$GREETING"')
    assert (result.exit_code, result.stdout) == (0, "/work/sub\nhi\n")
    fresh = await sandbox_client.exec(sandbox_id, 'pwd; echo "[$GREETING]"')
    assert fresh.stdout == "/work\n[]\n"
    other = await sandbox_client.session_open(sandbox_id, cwd="/tmp", env={"A": "1"})
    assert (await sandbox_client.session_run(sandbox_id, other, "pwd; echo $A")).stdout == "/tmp\n1\n"


async def test_session_reports_exit_code_and_stderr_and_exit_keeps_the_session(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    result = await sandbox_client.session_run(sandbox_id, session, "echo out; echo err >&2; exit 7")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert not (result.timed_out or result.truncated or result.oom_killed)
    assert (await sandbox_client.session_run(sandbox_id, session, "echo again")).stdout == "again\n"


async def test_session_timeout_kills_the_command_tree_and_the_session_lives_on(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    result = await sandbox_client.session_run(
        sandbox_id, session, "echo partial; (sleep 100003 &); setsid sleep 100002 & sleep 100001", timeout_s=1
    )
    assert result.timed_out and result.exit_code == 137 and result.stdout == "partial\n"
    ps = await sandbox_client.session_run(sandbox_id, session, "ps -eo args")
    assert "sleep 10000" not in ps.stdout
    assert (await sandbox_client.session_run(sandbox_id, session, "echo alive")).stdout == "alive\n"


async def test_interrupt_stops_the_running_command_with_sigint(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    results = []

    async def run() -> None:
        results.append(
            await sandbox_client.session_run(sandbox_id, session, "echo go; sleep 30", timeout_s=20)
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(1.0)
        await sandbox_client.session_interrupt(sandbox_id, session)
    assert results[0].exit_code == 130 and not results[0].timed_out and results[0].stdout == "go\n"
    assert (await sandbox_client.session_run(sandbox_id, session, "echo next")).stdout == "next\n"


async def test_session_output_is_capped_keeping_head_and_tail(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    result = await sandbox_client.session_run(
        sandbox_id, session, "echo FIRST; seq 1 200000; echo LAST", max_output_bytes=1000
    )
    assert result.truncated and result.exit_code == 0
    assert result.stdout.startswith("FIRST\n1\n2\n") and result.stdout.endswith("200000\nLAST\n")
    assert "bytes truncated" in result.stdout and len(result.stdout) < 1100


async def test_closed_session_and_unknown_session_raise_not_found(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    session = await sandbox_client.session_open(sandbox_id)
    await sandbox_client.session_close(sandbox_id, session)
    await sandbox_client.session_close(sandbox_id, session)  # twice is fine
    with pytest.raises(SandboxNotFound, match="no such session"):
        await sandbox_client.session_run(sandbox_id, session, "true")
    with pytest.raises(SandboxNotFound, match="no such session"):
        await sandbox_client.session_run(sandbox_id, "s-00000000", "true")


async def test_a_command_cannot_kill_the_driver_and_one_that_kills_its_shell_gets_a_new_one(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    # $PPID of the shell is the session driver: root, out of the agent uid's reach.
    driver = await sandbox_client.exec(sandbox_id, "kill -9 $PPID")
    assert driver.exit_code != 0 and "Operation not permitted" in driver.stderr
    # The command's own parent is its shell (the agent's): killing it ends the command, not the session.
    kill_shell = "echo bye; p=$BASHPID; kill -9 $(cut -d' ' -f4 /proc/$p/stat); sleep 5"
    killed = await sandbox_client.exec(sandbox_id, kill_shell)
    assert killed.exit_code == 137 and "ended its shell" in killed.stderr and killed.stdout == "bye\n"
    assert (await sandbox_client.exec(sandbox_id, "echo back")).stdout == "back\n"
    session = await sandbox_client.session_open(sandbox_id)
    await sandbox_client.session_run(sandbox_id, session, "cd /tmp && export KEPT=1")
    again = await sandbox_client.session_run(sandbox_id, session, kill_shell)
    assert again.exit_code == 137 and "ended its shell" in again.stderr
    after = await sandbox_client.session_run(sandbox_id, session, 'pwd; echo "$KEPT"')
    assert after.stdout == "/tmp\n1\n"  # the new shell starts from the cwd and exports last saved


async def test_concurrent_execs_in_one_sandbox_all_answer(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    outputs: dict[int, str] = {}

    async def run(i: int) -> None:
        outputs[i] = (await sandbox_client.exec(sandbox_id, f"sleep 0.3; echo {i}")).stdout

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(run, i)
    assert outputs == {i: f"{i}\n" for i in range(4)}


async def test_too_many_sessions_and_bad_env_names_are_refused(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    for _ in range(8):  # settings.max_sessions
        await sandbox_client.session_open(sandbox_id)
    with pytest.raises(SandboxCapacity):
        await sandbox_client.session_open(sandbox_id)
    with pytest.raises(SandboxBadRequest, match="shell identifiers"):
        await sandbox_client.session_open(sandbox_id, env={"BAD-NAME": "x"})


async def test_exec_with_env_and_cwd_matches_docker_exec(
    sandbox_client: SandboxClient, sandbox_id: str
) -> None:
    result = await sandbox_client.exec(
        sandbox_id, 'echo "$X|$Y"; pwd', cwd="/tmp", env={"X": "a b", "Y": "'q'"}
    )
    assert result.stdout == "a b|'q'\n/tmp\n"
    missing = await sandbox_client.exec(sandbox_id, "true", cwd="/nope")
    assert missing.exit_code == 126 and "/nope" in missing.stderr


async def test_warm_pool_serves_create_and_refills(nc: NATS, base_image: str) -> None:
    settings = settings_for_tests(nc, warm_pool=2)
    async with running_sandboxd(nc, settings) as owner, DockerOps() as ops:
        client = SandboxClient(nc)
        pooled = await _wait_for_containers(ops, owner, 2)
        created = await client.create(labels={"rollstream.traj": "t"})
        assert created.container in pooled
        assert (await client.exec(created.sandbox_id, "pwd")).stdout == "/work\n"
        custom = await client.create(memory_mb=200)  # non-default limits: a cold container
        assert custom.container not in pooled
        await _wait_for_containers(ops, owner, 4)  # 2 sandboxes + a refilled pool of 2
        await client.close(created.sandbox_id)
        await client.close(custom.sandbox_id)
    assert await containers_of(owner) == []


async def _wait_for_containers(ops: DockerOps, owner: str, n: int) -> list[str]:
    with anyio.fail_after(60):
        while len(found := await ops.list_sandboxes(owner=owner)) < n:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    return [c["Names"][0].lstrip("/") for c in found]
