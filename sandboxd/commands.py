"""How sandboxd runs the agent's commands: ``exec`` through the sandbox's idle exec session (a fork
in a resident shell) or else one ``docker exec``; explicit sessions (``session_*``); and how a dead
container, an OOM kill or a lost session is told apart and reported.

Every agent command runs as the agent uid, whichever path it takes; a timeout ends every process
of that uid in the sandbox (the only boundary no escape trick leaves: ``setsid``, double forks,
``nohup`` and a cleared environment all keep the uid).
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from sandboxd import limits
from sandboxd.docker_ops import DockerOps, ExecOutcome
from sandboxd.errors import (
    SandboxCapacity,
    SandboxError,
    SandboxNotFound,
    SandboxOOM,
    SandboxStartupFailed,
)
from sandboxd.session import Session, SessionCorrupt, SessionLost, SessionOutcome, exec_prelude
from sandboxd.settings import SandboxdSettings
from sandboxd.users import AGENT_GID, AGENT_UID
from schemas.sandbox import ExecRequest, ExecResult, SessionOpened, SessionOpenRequest, SessionRunRequest

EXEC_GRACE_S = 5.0  # output stream may outlive `timeout` (a background child holds it): then we kill
FILE_OP_DEADLINE_S = 30.0
AGENT_USER_SPEC = f"{AGENT_UID}:{AGENT_GID}"
# Run as the agent uid: kill(-1) reaches every process of the caller's uid but the caller itself.
KILL_AGENTS = (
    "n=0; for f in /proc/[0-9]*/status; do"
    ' while read -r k v _; do [ "$k" = Uid: ] && { [ "$v" = "$1" ] && n=$((n+1)); break; }; done <"$f";'
    " done 2>/dev/null; kill -9 -1 2>/dev/null; echo $((n-1))"
)
OOM_COUNT = (
    "cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null"
    " | awk '$1==\"oom_kill\"{print $2}'"
)


class Sandbox(msgspec.Struct, kw_only=True):
    sandbox_id: str
    container_id: str
    expires: float
    token: str  # the capability ``create`` returned; every agent operation must carry it
    env: dict[str, str] = {}  # the create request's env: given to the agent's commands only
    oom_kills: int = 0
    labels: dict[str, str] = {}
    exec_session: Session | None = None  # serves `exec` while idle; a busy one sends exec to docker
    sessions: dict[str, Session] = {}  # opened by session_open
    opening: anyio.Lock = msgspec.field(default_factory=anyio.Lock)
    sealed: bool = False  # verification began: no agent operation is accepted any more
    agent_ops: int = 0  # agent operations in flight (verification waits for them to end)
    verifying: anyio.Lock = msgspec.field(default_factory=anyio.Lock)

    def all_sessions(self) -> list[Session]:
        return [*self.sessions.values(), *([self.exec_session] if self.exec_session else [])]


class Commands:
    """Command execution for ``Daemon`` (a mixin: it uses the daemon's table, settings and Docker)."""

    settings: SandboxdSettings
    ops: DockerOps
    sandboxes: dict[str, Sandbox]
    by_container: dict[str, str]
    log: Any

    def _get(self, sandbox_id: str) -> Sandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(
                "no such sandbox (closed, expired, or never created)", sandbox_id=sandbox_id
            )
        return sb

    async def exec(self, req: ExecRequest) -> ExecResult:
        sb = self._get(req.sandbox_id)
        limits.check_command(req.command, req.timeout_s, req.max_output_bytes, self.settings)
        limits.check_env(req.env, "env")
        env = sb.env | dict(req.env)
        if self.settings.exec_via_session:
            session = await self._exec_session(sb)
            if session is not None and not session.lock.locked():
                async with session.lock:
                    prelude = exec_prelude(req.cwd, env)
                    result = await self._run_in(
                        sb, session, req.command, prelude, req.timeout_s, req.max_output_bytes
                    )
                if result is not None:
                    return result
        return await self._exec_by_docker(sb, req, env)

    async def _exec_session(self, sb: Sandbox) -> Session | None:
        """The sandbox's exec session, opened on first use; None if it cannot be (no perl in the image)."""
        async with sb.opening:
            if sb.exec_session is None or not sb.exec_session.alive:
                sb.exec_session = await self._open_session(sb, "/work", {}, keep=False)
            return sb.exec_session

    async def _open_session(
        self, sb: Sandbox, cwd: str, env: dict[str, str], *, keep: bool
    ) -> Session | None:
        try:
            return await Session.open(self.ops.streams_client, sb.container_id, cwd=cwd, env=env, keep=keep)
        except SandboxNotFound:
            await self._raise_if_dead(sb)
            return None
        except SandboxError as exc:
            self.log.warning("session.open_failed", sandbox_id=sb.sandbox_id, error=exc.message)
            return None

    async def _run_in(
        self, sb: Sandbox, session: Session, command: str, prelude: str, timeout_s: float, cap: int
    ) -> ExecResult | None:
        """One command through ``session`` (lock held); a session lost with its container says why.
        None: the exec session could not even stage the command (its tmpfs is full): use docker exec."""
        keep = session is not sb.exec_session
        try:
            outcome = await session.run(
                command, prelude=prelude, keep=keep, timeout_s=timeout_s, max_output_bytes=cap
            )
        except SessionLost as exc:
            await self._raise_if_dead(sb)
            if keep:
                sb.sessions.pop(session.session_id, None)
            if isinstance(exc, SessionCorrupt) or keep:
                self.log.warning("session.lost", sandbox_id=sb.sandbox_id, error=exc.message)
                raise SandboxError(f"{exc.message}; open a new session", sandbox_id=sb.sandbox_id) from exc
            return ExecResult(
                exit_code=137,
                stdout=exc.stdout.text() if exc.stdout else "",
                stderr=(exc.stderr.text() if exc.stderr else "") + "[sandboxd: the session was lost]\n",
                oom_killed=await self._oom_happened(sb),
            )
        if not outcome.prepared and not keep:
            return None
        return self._result_of(sb, outcome)

    def _result_of(self, sb: Sandbox, outcome: SessionOutcome) -> ExecResult:
        oom = False
        if outcome.oom_kills is not None:
            oom = outcome.oom_kills > sb.oom_kills and outcome.exit_code == 137 and not outcome.timed_out
            sb.oom_kills = outcome.oom_kills
        stderr = outcome.stderr.text()
        if not outcome.started:
            stderr += "[sandboxd: the command could not start (process limit reached?)]\n"
        if outcome.shell_died:
            stderr += "[sandboxd: the command ended its shell]\n"
        return ExecResult(
            exit_code=outcome.exit_code,
            stdout=outcome.stdout.text(),
            stderr=stderr,
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            timed_out=outcome.timed_out,
            oom_killed=oom,
            duration_ms=outcome.duration_ms,
        )

    async def session_open(self, req: SessionOpenRequest) -> SessionOpened:
        sb = self._get(req.sandbox_id)
        limits.check_env(req.env, "env")
        limits.absolute_path(req.cwd, "cwd")
        if len(sb.sessions) >= self.settings.max_sessions:
            raise SandboxCapacity(
                f"the sandbox already has {len(sb.sessions)} sessions", sandbox_id=sb.sandbox_id
            )
        session = await self._open_session(sb, req.cwd, sb.env | dict(req.env), keep=True)
        if session is None:
            raise SandboxStartupFailed("cannot start a session (does the image have perl and bash?)")
        sb.sessions[session.session_id] = session
        return SessionOpened(sandbox_id=sb.sandbox_id, session_id=session.session_id)

    async def session_run(self, req: SessionRunRequest) -> ExecResult:
        limits.check_command(req.command, req.timeout_s, req.max_output_bytes, self.settings)
        session = self._session(req.sandbox_id, req.session_id)
        sb = self._get(req.sandbox_id)
        async with session.lock:
            result = await self._run_in(sb, session, req.command, "", req.timeout_s, req.max_output_bytes)
        assert result is not None  # only exec sessions give None
        return result

    def _session(self, sandbox_id: str, session_id: str) -> Session:
        session = self._get(sandbox_id).sessions.get(session_id)
        if session is None or not session.alive:
            raise SandboxNotFound(f"no such session {session_id!r} (closed or ended)", sandbox_id=sandbox_id)
        return session

    async def _exec_by_docker(self, sb: Sandbox, req: ExecRequest, env: dict[str, str]) -> ExecResult:
        """``exec`` as one ``docker exec`` of the agent uid under ``timeout -s KILL`` (when no idle
        session can serve it); past its timeout every agent process is killed."""
        argv = ["timeout", "-s", "KILL", f"{req.timeout_s:.3f}", "bash", "-c", req.command]
        outcome = await self._exec_in(
            sb,
            argv,
            env=env,
            cwd=req.cwd,
            user=AGENT_USER_SPEC,
            max_output_bytes=req.max_output_bytes,
            deadline_s=req.timeout_s + EXEC_GRACE_S,
        )
        timed_out = not outcome.finished or (
            outcome.exit_code in (124, 137) and outcome.duration_ms >= req.timeout_s * 1000 * 0.95
        )
        if timed_out:
            await self.kill_agents(sb)
        oom = outcome.exit_code == 137 and not timed_out and await self._oom_happened(sb)
        stdout, stderr = outcome.stdout.text(), outcome.stderr.text()
        if outcome.exit_code == 126 and stdout.startswith("OCI runtime exec failed"):
            # Docker could not start the command (e.g. cwd does not exist): report it as a shell would.
            stdout, stderr = "", stdout.strip() + "\n"
        return ExecResult(
            exit_code=outcome.exit_code if outcome.exit_code is not None else -1,
            stdout=stdout,
            stderr=stderr,
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            timed_out=timed_out,
            oom_killed=oom,
            duration_ms=outcome.duration_ms,
        )

    async def kill_agents(self, sb: Sandbox) -> int | None:
        """Kill every process of the agent uid in ``sb``; returns how many there were (None: not known).

        Through the exec session's driver when it can (no fork needed, so a sandbox at its process
        limit is no obstacle), else through a ``docker exec`` of the agent uid (``kill -9 -1``)."""
        session = sb.exec_session
        if session is not None and session.alive:
            try:
                if not session.lock.locked():
                    async with session.lock:
                        found, _left = await session.seal()
                    return found
                if await session.signal(kill=True):
                    return None
            except (SessionLost, TimeoutError) as exc:
                self.log.warning("sandbox.sweep_failed", sandbox_id=sb.sandbox_id, error=str(exc))
                sb.exec_session = None
                await session.close()
        for attempt in range(5):
            outcome = await self._exec_in(
                sb,
                ["bash", "-c", KILL_AGENTS, "kill", str(AGENT_UID)],
                user=AGENT_USER_SPEC,
                deadline_s=FILE_OP_DEADLINE_S,
            )
            if outcome.exit_code == 0 and outcome.stdout.raw().strip().lstrip(b"-").isdigit():
                return max(0, int(outcome.stdout.raw()))
            await anyio.sleep(0.1 * (attempt + 1))  # no process slot for the exec yet
        raise SandboxError("cannot end the agent's processes (the sandbox is at its process limit)")

    async def _exec_in(self, sb: Sandbox, argv: list[str], **kwargs: Any) -> ExecOutcome:
        """Run in ``sb``'s container; if the container died meanwhile, say so (``oom`` or ``not_found``)."""
        try:
            outcome = await self.ops.exec(sb.container_id, argv, **kwargs)
        except SandboxNotFound:
            outcome = None
        if outcome is not None and outcome.exit_code not in (None, 137):
            return outcome
        await self._raise_if_dead(sb)
        if outcome is None:
            raise SandboxNotFound("container refused the exec", sandbox_id=sb.sandbox_id)
        return outcome

    async def _raise_if_dead(self, sb: Sandbox) -> None:
        """If ``sb``'s container no longer runs, forget it and raise ``SandboxOOM`` or ``SandboxNotFound``."""
        state = await self.ops.state(sb.container_id)
        if state is not None and state.get("Running"):
            return
        self.sandboxes.pop(sb.sandbox_id, None)
        self.by_container.pop(sb.container_id, None)
        for session in sb.all_sessions():
            await session.close()
        if state is not None and state.get("OOMKilled"):
            raise SandboxOOM("the sandbox ran out of memory and died", sandbox_id=sb.sandbox_id)
        detail = f"exited with {state.get('ExitCode')}" if state else "was removed"
        raise SandboxNotFound(f"the sandbox's container {detail}", sandbox_id=sb.sandbox_id)

    async def _oom_happened(self, sb: Sandbox) -> bool:
        """True if the kernel OOM-killed something in ``sb`` since the last check (cgroup counter)."""
        outcome = await self._exec_in(sb, ["sh", "-c", OOM_COUNT], deadline_s=FILE_OP_DEADLINE_S)
        try:
            count = int(outcome.stdout.raw().split()[0])
        except (IndexError, ValueError):
            return False
        happened, sb.oom_kills = count > sb.oom_kills, count
        return happened
