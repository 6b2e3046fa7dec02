"""Verification the agent cannot influence: the ``verify`` operation.

1. Seal: no agent operation is accepted any more, the agent's sessions are closed, the operations
   still in flight end, and every process of the agent uid is killed (repeatedly, until none is
   left and none can start). What the agent left is files, nothing that runs.
2. Each verify command runs in a fresh ``docker exec`` as the verifier uid, with a clean
   environment and a private fresh HOME, after a check that no agent process is alive and after
   killing whatever an earlier verify command left running. Its output travels on that exec's own
   stream, which only the verifier's processes hold: no agent process exists to write to it.
   Before the first, an imported task's test files are placed (``clear``, ``files``) by root,
   each through a fresh ``docker exec`` too: what the agent left in those directories is gone.
3. ``result_path`` is read the same way; then the sandbox is removed (``close``).

Why this and not freezing the agent or a fresh sandbox: a frozen process still holds its file
descriptors (and thaws), and re-running the agent's commands elsewhere re-runs the attack; a dead
uid holds nothing. The verifier uid is not the agent's, so not even a process that escaped the
kill could signal, trace or write to a verify command.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from sandboxd import limits
from sandboxd.commands import AGENT_USER_SPEC, FILE_OP_DEADLINE_S, Commands, Sandbox
from sandboxd.docker_ops import DockerOps, ExecOutcome
from sandboxd.errors import SandboxError, SandboxForbidden
from sandboxd.users import AGENT_UID, VERIFIER_GID, VERIFIER_UID, VERIFIER_USER
from schemas.sandbox import ExecResult, InspectRequest, VerifyRequest, VerifyResult

VERIFIER = f"{VERIFIER_UID}:{VERIFIER_GID}"
QUIESCE_S = 5.0  # how long in-flight agent operations get to end after their processes are killed
SEAL_ROUNDS = 3
AGENTS_ALIVE = 125  # the verify script's exit code when it finds an agent process (it then runs nothing)
# $1 agent uid, $2 cwd, $3 timeout, $4 command. Counts live agent processes (refusing to run if any),
# kills what earlier verifier commands left, makes a private HOME, then runs the command.
VERIFY_SCRIPT = r"""
n=0
for f in /proc/[0-9]*/status; do
  s=
  while read -r k v _; do
    case $k in State:) s=$v ;; Uid:) [ "$v" = "$1" ] && [ "$s" != Z ] && n=$((n+1)); break ;; esac
  done <"$f"
done 2>/dev/null
if [ "$n" != 0 ]; then echo "sandboxd: $n agent processes are alive; nothing was verified" >&2; exit 125; fi
kill -9 -1 2>/dev/null
umask 077; HOME=$(mktemp -d /tmp/.rs-verify.XXXXXXXX 2>/dev/null) || HOME=/nonexistent
export HOME TMPDIR=$HOME; umask 022
cd -- "$2" || exit 126
exec timeout -s KILL "$3" bash -c "$4"
"""
# $1 directory. Root here holds no CAP_CHOWN nor CAP_DAC_OVERRIDE, so the fresh directory is made
# writable by all: no agent process is left to write to it, and the verifier must (reward files).
CLEAR = 'rm -rf -- "$1" && mkdir -p -- "$1" && chmod 0777 -- "$1"'
# $1 path, $2 octal mode; the file's bytes on stdin. A symlink the agent left at the path is replaced.
PLACE = 'mkdir -p -- "${1%/*}/" && rm -f -- "$1" && cat >"$1" && chmod -- "$2" "$1"'
ROOT = "0:0"
ROOT_ENV = {"LANG": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
READ_RESULT = 'kill -9 -1 2>/dev/null; test -f "$1" && head -c "$2" -- "$1"'
VERIFY_ENV = {
    "LANG": "C.UTF-8",
    "USER": VERIFIER_USER,
    "LOGNAME": VERIFIER_USER,
    "PYTHONSAFEPATH": "1",  # no module of the agent's cwd shadows the verifier's imports
    "PYTHONNOUSERSITE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


class Verification(Commands):
    """The ``verify`` operation for ``Daemon`` (a mixin over ``Commands``)."""

    ops: DockerOps
    log: Any
    close_sandbox: Callable[[Sandbox], Awaitable[None]]  # the daemon's: remove it and forget it

    async def verify(self, req: VerifyRequest) -> VerifyResult:
        limits.check_verify(req, self.settings)
        sb = self._get(req.sandbox_id)
        try:
            async with sb.verifying:
                started = time.monotonic()
                found = await self._seal(sb)
                seal_ms = (time.monotonic() - started) * 1000
                await self._place(sb, req)
                results = await self._run_checks(sb, req)
                data = await self._read_result(sb, req) if req.result_path else None
        finally:
            if req.close:
                await self.close_sandbox(sb)
        passed = len(results) == len(req.commands) and all(
            r.exit_code == 0 and not r.timed_out for r in results
        )
        self.log.debug("sandbox.verified", sandbox_id=sb.sandbox_id, passed=passed, agents=found)
        return VerifyResult(
            passed=passed, results=results, result_data=data, agent_processes=found, seal_ms=seal_ms
        )

    async def inspect(self, req: InspectRequest) -> ExecResult:
        """Run the caller's command as root beside the agent's live processes (see ``InspectRequest``);
        refused once the sandbox is sealed, since then there is nothing of the agent left to see."""
        limits.check_inspect(req, self.settings)
        sb = self._get(req.sandbox_id)
        if sb.sealed:
            raise SandboxForbidden("the sandbox is sealed: verification began", sandbox_id=sb.sandbox_id)
        outcome = await self._exec_in(
            sb,
            ["bash", "-c", req.command],
            env={"LANG": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            user="0:0",
            max_output_bytes=req.max_output_bytes,
            deadline_s=req.timeout_s + FILE_OP_DEADLINE_S,
        )
        return ExecResult(
            exit_code=outcome.exit_code if outcome.exit_code is not None else -1,
            stdout=outcome.stdout.text(),
            stderr=outcome.stderr.text(),
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            timed_out=not outcome.finished,
            duration_ms=outcome.duration_ms,
        )

    async def _seal(self, sb: Sandbox) -> int:
        """End the agent for good; returns how many of its processes were still alive."""
        sb.sealed = True
        for session in list(sb.sessions.values()):
            await session.close()
        sb.sessions.clear()
        found = 0
        for _ in range(SEAL_ROUNDS):
            found += await self.kill_agents(sb) or 0
            with anyio.move_on_after(QUIESCE_S):
                while sb.agent_ops:  # noqa: ASYNC110  (a counter, not an event: polled briefly)
                    await anyio.sleep(0.02)
            if not sb.agent_ops:
                found += await self.kill_agents(sb) or 0  # nothing of the agent can start after this
                break
        else:
            raise SandboxError(
                "the agent's operations did not end; nothing was verified", sandbox_id=sb.sandbox_id
            )
        if sb.exec_session is not None:
            await sb.exec_session.close()
            sb.exec_session = None
        return found

    async def _place(self, sb: Sandbox, req: VerifyRequest) -> None:
        """Empty ``req.clear`` and write ``req.files`` after the seal: as root in the fresh ``clear``
        directories; elsewhere (a task's working directory) as the agent uid, so no more than the
        agent itself could have written there (root holds no CAP_DAC_OVERRIDE to write it anyway)."""
        clear = [limits.absolute_path(d) for d in req.clear]
        steps: list[tuple[list[str], bytes | None, str]] = [
            (["sh", "-c", CLEAR, "clear", d], None, ROOT) for d in clear
        ]
        for path, body in sorted(req.files.items()):
            where = limits.absolute_path(path)
            mode = "0755" if where.endswith(".sh") else "0644"
            user = ROOT if any(where.startswith(d.rstrip("/") + "/") for d in clear) else AGENT_USER_SPEC
            steps.append((["sh", "-c", PLACE, "place", where, mode], body, user))
        for argv, stdin, user in steps:
            outcome = await self._exec_in(
                sb, argv, stdin=stdin, env=ROOT_ENV, user=user, deadline_s=FILE_OP_DEADLINE_S
            )
            if outcome.exit_code != 0:
                raise SandboxError(
                    f"cannot place the verifier's {argv[4]}: {outcome.stderr.text().strip()[:300]}",
                    sandbox_id=sb.sandbox_id,
                )

    async def _run_checks(self, sb: Sandbox, req: VerifyRequest) -> list[ExecResult]:
        results: list[ExecResult] = []
        for command in req.commands:
            result = await self._verify_one(sb, req, command)
            results.append(result)
            if result.exit_code != 0 or result.timed_out:
                break
        return results

    async def _verify_one(self, sb: Sandbox, req: VerifyRequest, command: str) -> ExecResult:
        for attempt in range(2):
            outcome = await self._as_verifier(sb, req, command)
            if outcome.exit_code != AGENTS_ALIVE or b"agent processes are alive" not in outcome.stderr.raw():
                break
            if attempt == 0:  # a process of the agent started after the seal (a late docker exec): again
                await self.kill_agents(sb)
        else:
            raise SandboxError(
                "agent processes outlived the seal; nothing was verified", sandbox_id=sb.sandbox_id
            )
        timed_out = not outcome.finished or (
            outcome.exit_code == 137 and outcome.duration_ms >= req.timeout_s * 1000 * 0.95
        )
        return ExecResult(
            exit_code=outcome.exit_code if outcome.exit_code is not None else -1,
            stdout=outcome.stdout.text(),
            stderr=outcome.stderr.text(),
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            timed_out=timed_out,
            duration_ms=outcome.duration_ms,
        )

    async def _as_verifier(self, sb: Sandbox, req: VerifyRequest, command: str) -> ExecOutcome:
        argv = [
            "bash",
            "-c",
            VERIFY_SCRIPT,
            "verify",
            str(AGENT_UID),
            req.cwd,
            f"{req.timeout_s:.3f}",
            command,
        ]
        return await self._exec_in(
            sb,
            argv,
            env=VERIFY_ENV | dict(req.env),
            user=VERIFIER,
            max_output_bytes=req.max_output_bytes,
            deadline_s=req.timeout_s + FILE_OP_DEADLINE_S,
        )

    async def _read_result(self, sb: Sandbox, req: VerifyRequest) -> bytes | None:
        cap = self.settings.max_output_bytes
        argv = ["sh", "-c", READ_RESULT, "read", limits.absolute_path(req.result_path), str(cap)]
        outcome = await self._exec_in(
            sb,
            argv,
            env=VERIFY_ENV,
            user=VERIFIER,
            max_output_bytes=cap,
            keep_tail=False,
            deadline_s=FILE_OP_DEADLINE_S,
        )
        return outcome.stdout.raw() if outcome.exit_code == 0 else None
