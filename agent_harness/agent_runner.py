"""The agent runner: one episode of an unmodified agent program, its model calls recorded.

With ``[rollout] agent = "command"`` a rollout worker runs, per episode, the program that
``[rollout.agent_command] argv`` names instead of the built-in loop. The program runs on the host,
in a fresh scratch directory as its ``HOME``, with an environment made only of what the settings
give plus:

- ``OPENAI_BASE_URL`` / ``OPENAI_API_BASE`` (``{base_url}``): the model proxy under a path
  private to the episode (``/s/<session>/v1``), so every model call is recorded in the episode's
  one trajectory, and ``OPENAI_API_KEY`` (unused, set because clients insist on one);
- ``rs-exec`` on its ``PATH`` (``{exec}``), and ``ROLLSTREAM_EXEC_URL``/``ROLLSTREAM_EXEC_TOKEN``:
  the only way into the episode's sandbox, where commands run with bash as the agent uid, bounded
  like the built-in loop's tool calls (``agent_harness.rs_exec``).

The episode ends when the program exits or after the episode's time limit (its whole process
group is killed). The trajectory then goes out as a built-in episode's does (``rs.traj.raw``, with
its task and sandbox) and the reward group verifies it in the sandbox through sandboxd's verify
channel, which the program cannot reach: it holds neither the sandbox's capability token nor
anything but the exec endpoint of its own session, closed when the episode ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import anyio
import msgspec
import structlog
from anyio.abc import Process, TaskStatus

from agent_harness import rs_bridge, rs_exec
from agent_harness.engine import InferenceEngine
from agent_harness.loop import SandboxAPI, SandboxFailed, create_sandbox, setup_sandbox
from agent_harness.proxy import ModelProxy, ProxySettings
from agent_harness.proxy_session import Identity, Session
from agent_harness.settings import HarnessSettings
from agent_harness.task_sandbox import episode_timeout
from sandboxd.errors import SandboxError
from sandboxd.model_socket import MOUNT as MODEL_SOCKET_MOUNT
from schemas.arrays import pack_tokens
from schemas.sandbox import ExecResult
from schemas.task import TaskSample
from schemas.trajectory import Trajectory, TrajStatus
from streams.bus import Publisher

log = structlog.get_logger(__name__)

PLACEHOLDERS = ("instruction", "base_url", "session", "workdir", "exec", "home")
KILL_GRACE_S = 2.0
NO_ARGV = 'rollout.agent = "command" needs rollout.agent_command.argv (the program to run)'


class AgentCommandSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The external agent program of ``[rollout] agent = "command"`` and its bounds."""

    argv: Annotated[
        list[str],
        msgspec.Meta(
            description="The program and its arguments; each may hold {instruction}, {base_url}, "
            "{session}, {workdir}, {exec} (the rs-exec shim) and {home} (its scratch directory)."
        ),
    ] = []
    env: Annotated[
        dict[str, str],
        msgspec.Meta(description="Environment of the program (nothing else of the worker's is passed)."),
    ] = msgspec.field(default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    command_timeout_s: Annotated[
        float, msgspec.Meta(gt=0.0, description="Longest one shell command of the agent may run.")
    ] = 60.0
    max_output_bytes: Annotated[
        int, msgspec.Meta(ge=2, description="Output of one command returned to the agent (stdout, stderr).")
    ] = 16384
    keep_scratch: Annotated[
        bool, msgspec.Meta(description="Keep each episode's scratch directory (the program's logs).")
    ] = False
    where: Annotated[
        Literal["host", "sandbox"],
        msgspec.Meta(
            description="Run the program on the host (its commands go to the sandbox through rs-exec) "
            "or inside the sandbox, whose one route out is the proxy's socket (needs "
            "sandboxd.model_socket_root and python3 in the image)."
        ),
    ] = "host"
    bridge_port: Annotated[
        int, msgspec.Meta(ge=1, le=65535, description="Loopback port of the proxy inside the sandbox.")
    ] = 8400

    def __post_init__(self) -> None:
        agent_argv(self.argv, dict.fromkeys(PLACEHOLDERS, ""))  # an unknown placeholder: at load time


def agent_argv(template: list[str], values: dict[str, str]) -> list[str]:
    """``template`` with its placeholders filled; an unknown ``{name}`` is a configuration error."""
    out = []
    for i, arg in enumerate(template):
        try:
            out.append(arg.format_map(values))
        except KeyError as exc:
            raise ValueError(
                f"rollout.agent_command.argv[{i}] = {arg!r}: unknown placeholder {{{exc.args[0]}}}; use "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + " (write {{ and }} for braces)"
            ) from None
        except (ValueError, IndexError) as exc:
            raise ValueError(
                f"rollout.agent_command.argv[{i}] = {arg!r}: {exc}; placeholders are "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + " (write {{ and }} for braces)"
            ) from None
    return out


class RunnerSandbox(SandboxAPI, Protocol):
    """What the runner needs of ``SandboxClient`` beyond the loop's part."""

    async def write_file(self, sandbox_id: str, path: str, data: bytes, mode: int = ...) -> None: ...

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = ...,
        cwd: str = ...,
        env: dict[str, str] | None = ...,
        max_output_bytes: int = ...,
    ) -> ExecResult: ...


BRIDGE_PATH = "/tmp/rs-bridge.py"
SOCKET_NAME = "proxy.sock"


class CommandAgentRunner:
    """Serves the model proxy for the episodes of one rollout process and runs their programs."""

    def __init__(
        self,
        settings: AgentCommandSettings,
        harness: HarnessSettings,
        engine: InferenceEngine,
        publisher: Publisher,
        run: str,
    ) -> None:
        if not settings.argv:
            raise ValueError(NO_ARGV)
        self.settings, self.harness, self.run = settings, harness, run
        proxy_settings = ProxySettings(port=0, max_new_tokens=harness.max_new_tokens_per_turn)
        self.proxy = ModelProxy(engine, publisher, run, proxy_settings, client_sessions=False)
        self.url = ""

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (any free port) until cancelled; ``task_status`` gets the base URL."""
        self.url = await self.proxy.start()
        task_status.started(self.url)
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.proxy.stop()

    async def episode(self, sample: TaskSample, sandbox: RunnerSandbox) -> Trajectory:
        """Run one episode; sandbox failures give an ``aborted`` trajectory, they never raise."""
        started = time.time()
        task = sample.task
        ident = Identity(
            traj_id=sample.msg_id,
            run=sample.run,
            task_id=task.task_id,
            family=task.family,
            group_id=sample.group_id,
            sample_idx=sample.sample_idx,
        )
        inside = self.settings.where == "sandbox"
        try:
            created = await create_sandbox(
                sample, sandbox, self.harness, **({"model_socket": True} if inside else {})
            )
        except SandboxFailed as exc:
            return _empty(ident, started, "aborted", str(exc))
        sid, owner = created.sandbox_id, created.owner
        try:
            await setup_sandbox(sample, sandbox, sid, self.harness)
        except SandboxFailed as exc:
            return _empty(ident, started, "aborted", str(exc), sid, owner)
        handler = None if inside else self._exec_handler(sandbox, sid, task.workdir)
        session = self.proxy.open_session(ident, handler)
        try:
            if inside:
                status, reason = await self._run_inside(
                    sample, session, sandbox, created.model_socket_dir, sid
                )
            else:
                status, reason = await self._run_program(sample, session)
        finally:
            await self.proxy.take(session.session_id)
        traj = session.trajectory(status=status, reason=reason)
        return msgspec.structs.replace(traj, sandbox_id=sid, sandbox_owner=owner, started_at=started)

    def _exec_handler(self, sandbox: SandboxAPI, sandbox_id: str, workdir: str) -> Any:
        limit, out_bytes = self.settings.command_timeout_s, self.settings.max_output_bytes

        async def run(command: str, timeout_s: float) -> dict[str, Any]:
            timeout = min(timeout_s, limit) if timeout_s > 0 else limit
            try:
                res = await sandbox.exec(
                    sandbox_id, command, timeout_s=timeout, cwd=workdir, max_output_bytes=out_bytes
                )
            except SandboxError as exc:  # the agent sees a failed command, the episode goes on
                return {"stdout": "", "stderr": f"sandbox error: {type(exc).__name__}\n", "exit_code": 255}
            return {
                "stdout": res.stdout,
                "stderr": res.stderr,
                "exit_code": res.exit_code,
                "timed_out": res.timed_out,
            }

        return run

    async def _run_program(self, sample: TaskSample, session: Session) -> tuple[TrajStatus, str]:
        """Start the program, wait for it (or the time limit); the episode's status and reason."""
        home = Path(await anyio.to_thread.run_sync(_make_scratch))
        try:
            argv, env = self._command(sample, session, home)
            limit = episode_timeout(sample.task, self.harness.episode_timeout_s)
            out = await anyio.to_thread.run_sync((home / "agent.log").open, "wb")
            try:
                proc = await anyio.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=home, env=env, start_new_session=True,
                )  # fmt: skip
            finally:
                out.close()  # the child holds its own copy
            code: int | None = None
            try:
                with anyio.move_on_after(limit):
                    code = await proc.wait()
            finally:
                with anyio.move_on_after(KILL_GRACE_S + 1, shield=True):
                    await _kill_group(proc)
                    await proc.wait()
            return await anyio.to_thread.run_sync(_outcome, code, home / "agent.log")
        except OSError as exc:
            return "aborted", f"agent_start: {exc}"
        finally:
            if self.settings.keep_scratch:
                log.info("agent_scratch", traj_id=sample.msg_id, path=str(home))
            else:
                await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, home, ignore_errors=True))

    async def _run_inside(
        self, sample: TaskSample, session: Session, sandbox: RunnerSandbox, socket_dir: str, sid: str
    ) -> tuple[TrajStatus, str]:
        """Run the program in the sandbox, behind the bridge to the proxy's socket in ``socket_dir``."""
        if not socket_dir:
            return "aborted", "sandboxd made no model socket"
        try:
            site = await self.proxy.listen_unix(os.path.join(socket_dir, SOCKET_NAME))
        except OSError as exc:  # e.g. a path past the 107 bytes a unix socket's name may hold
            return "aborted", f"model_socket: {exc}"
        try:
            bridge = await anyio.Path(rs_bridge.__file__).read_bytes()
            await sandbox.write_file(sid, BRIDGE_PATH, bridge, 0o644)
            base = f"http://127.0.0.1:{self.settings.bridge_port}/s/{session.session_id}/v1"
            values = self._values(sample, session, base, exec_path="", home="/tmp")
            program = shlex.join(agent_argv(self.settings.argv, values))
            sock = f"{MODEL_SOCKET_MOUNT}/{SOCKET_NAME}"
            command = (
                f"python3 {BRIDGE_PATH} {self.settings.bridge_port} {sock} & B=$!; sleep 0.3; "
                f"{program}; rc=$?; kill $B; exit $rc"
            )
            limit = episode_timeout(sample.task, self.harness.episode_timeout_s)
            env = self._env(sample, session, base) | {"HOME": sample.task.workdir}
            res = await sandbox.exec(
                sid, command, timeout_s=limit, cwd=sample.task.workdir, env=env,
                max_output_bytes=self.settings.max_output_bytes,
            )  # fmt: skip
        except SandboxError as exc:
            return "aborted", f"agent_in_sandbox: {type(exc).__name__}: {exc}"
        finally:
            await site.stop()
        if res.timed_out:
            return "truncated", "episode_timeout"
        if res.exit_code == 0:
            return "completed", ""
        tail = (res.stdout + res.stderr).strip().splitlines()
        return "truncated", f"agent_exit: status {res.exit_code}: {tail[-1][:200] if tail else ''}"

    def _values(
        self, sample: TaskSample, session: Session, base: str, *, exec_path: str, home: str
    ) -> dict[str, str]:
        return {
            "instruction": sample.task.instruction,
            "base_url": base,
            "session": session.session_id,
            "workdir": sample.task.workdir,
            "exec": exec_path,
            "home": home,
        }

    def _env(self, sample: TaskSample, session: Session, base: str) -> dict[str, str]:
        return dict(self.settings.env) | {
            "OPENAI_BASE_URL": base,
            "OPENAI_API_BASE": base,
            "OPENAI_API_KEY": "rollstream",
            "ROLLSTREAM_SESSION": session.session_id,
            "ROLLSTREAM_WORKDIR": sample.task.workdir,
        }

    def _command(self, sample: TaskSample, session: Session, home: Path) -> tuple[list[str], dict[str, str]]:
        shim = home / "bin" / "rs-exec"
        origin = self.url.removesuffix("/v1")
        base = f"{origin}/s/{session.session_id}/v1"
        values = self._values(sample, session, base, exec_path=str(shim), home=str(home))
        env = self._env(sample, session, base) | {
            "HOME": str(home),
            "PATH": f"{shim.parent}:{self.settings.env.get('PATH', '/usr/bin:/bin')}",
            "ROLLSTREAM_EXEC_URL": f"{origin}/s/{session.session_id}/rollstream/exec",
            "ROLLSTREAM_EXEC_TOKEN": session.exec_token,
        }
        return agent_argv(self.settings.argv, values), env


def _make_scratch() -> str:
    """A fresh scratch directory holding the ``rs-exec`` shim in ``bin/`` (blocking)."""
    home = Path(tempfile.mkdtemp(prefix="rs-agent-"))
    shim = home / "bin" / "rs-exec"
    shim.parent.mkdir()
    shim.write_text(f"#!{sys.executable}\n" + Path(rs_exec.__file__).read_text())
    shim.chmod(0o755)
    return str(home)


async def _kill_group(proc: Process) -> None:
    """End the program and everything it started in its process group: TERM, up to
    ``KILL_GRACE_S`` for the program to exit, then KILL for whatever is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGTERM:
            with anyio.move_on_after(KILL_GRACE_S):
                await proc.wait()


def _outcome(code: int | None, log_path: Path) -> tuple[TrajStatus, str]:
    if code is None:
        return "truncated", "episode_timeout"
    if code == 0:
        return "completed", ""
    tail = log_path.read_bytes()[-300:].decode("utf-8", "replace").strip().splitlines()
    return "truncated", f"agent_exit: status {code}: {tail[-1][:200] if tail else ''}"


def _empty(
    ident: Identity, started: float, status: TrajStatus, reason: str, sandbox_id: str = "", owner: str = ""
) -> Trajectory:
    return Trajectory(
        traj_id=ident.traj_id,
        run=ident.run,
        task_id=ident.task_id,
        family=ident.family,
        group_id=ident.group_id,
        sample_idx=ident.sample_idx,
        prompt_tokens=pack_tokens([]),
        chunks=[],
        status=status,
        min_version=0,
        max_version=0,
        sandbox_id=sandbox_id,
        sandbox_owner=owner,
        abort_reason=reason,
        started_at=started,
        finished_at=time.time(),
        source="proxy",
    )
