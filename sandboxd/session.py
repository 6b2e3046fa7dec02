"""Persistent sessions: one long-lived ``docker exec`` per session running the driver of
``session_driver``; a command is one request line on its stdin and a few frames on its stdout.

``Session.run`` returns a ``SessionOutcome``; a session whose driver died (or that stopped answering)
raises ``SessionLost`` and is dead for good: the caller decides what that means for the sandbox.
"""

from __future__ import annotations

import re
import secrets
import shlex
import time
from collections.abc import Mapping
from typing import Any

import aiodocker
import aiohttp
import anyio
import msgspec
import structlog

from sandboxd.docker_ops import Capture
from sandboxd.errors import SandboxBadRequest, SandboxError, SandboxNotFound
from sandboxd.session_driver import DRIVER, EXECUTOR

DRIVER_GRACE_S = 10.0  # beyond a command's timeout: the driver's own kill (2 s) and give-up (3 s) bounds
OPEN_TIMEOUT_S = 30.0
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SESSION_DIR = "/dev/shm/.rs-"  # its own tmpfs: a full /work or /tmp does not stop the session
# Starts bash as the driver's executor from a file, so `ps` shows neither script in full.
BOOT = (
    "$0 = 'sandboxd-session'; my ($d, $x) = @ARGV; mkdir $d, 0700; open(my $f, '>', \"$d/x\") or die $!;"
    " print $f $x; close $f; @ARGV = ($d, '. \"$1/x\"'); eval $ENV{RS_DRIVER}; die $@ if $@;"
)

log = structlog.get_logger()


class SessionLost(SandboxError):
    """The session's driver is gone (killed by a command, or its container died)."""

    stdout: Capture | None = None  # what the command had printed when the session was lost
    stderr: Capture | None = None


class SessionOutcome(msgspec.Struct, kw_only=True):
    exit_code: int
    stdout: Capture
    stderr: Capture
    timed_out: bool
    oom_kills: int | None  # the cgroup's OOM-kill counter after a SIGKILLed command, else None
    started: bool  # False: the command never ran (no process slot, no room for its files)
    prepared: bool  # False: the driver could not write the command's files (nothing was tried)
    duration_ms: float


def exec_prelude(cwd: str, env: Mapping[str, str]) -> str:
    """Shell lines that give a one-off command its cwd and environment (what ``docker exec`` would)."""
    bad = [k for k in env if not ENV_NAME_RE.match(k)]
    if bad:
        raise SandboxBadRequest(f"env names must be shell identifiers, got {bad!r}")
    lines = [f"cd -- {shlex.quote(cwd)} || exit 126"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


class Session:
    """One driver process in one container; runs one command at a time (callers hold ``lock``)."""

    def __init__(self, session_id: str, stream: Any) -> None:
        self.session_id = session_id
        self.stream = stream
        self.lock = anyio.Lock()
        self.alive = True
        self.token = ""  # the running command's token ("" when idle)
        self._buf = bytearray()

    @classmethod
    async def open(
        cls,
        docker: aiodocker.Docker,
        container_id: str,
        *,
        cwd: str = "/work",
        env: Mapping[str, str] | None = None,
        session_id: str = "",
    ) -> Session:
        """Start the driver in ``container_id`` (needs ``perl`` and ``bash`` in the image)."""
        session_id = session_id or f"s-{secrets.token_hex(4)}"
        container = docker.containers.container(container_id)
        argv = ["perl", "-e", BOOT, SESSION_DIR + session_id, EXECUTOR]
        environment = dict(env or {}) | {"RS_DRIVER": "delete $ENV{RS_DRIVER};\n" + DRIVER}
        with anyio.fail_after(OPEN_TIMEOUT_S):
            try:
                exe = await container.exec(argv, stdin=True, environment=environment, workdir=cwd)
                stream = exe.start(detach=False)
                await stream._init()  # attach now: the driver blocks on its stdin until our first line
            except aiodocker.DockerError as exc:
                if exc.status in (404, 409):
                    raise SandboxNotFound(f"container is gone or not running ({exc.message})") from exc
                raise SandboxError(f"cannot start a session: {exc.message}") from exc
        return cls(session_id, stream)

    async def run(
        self, command: str, *, prelude: str, keep: bool, timeout_s: float, max_output_bytes: int
    ) -> SessionOutcome:
        """Run ``command`` (caller holds ``lock``); raises ``SessionLost`` if the driver dies meanwhile."""
        if not self.alive:
            raise SessionLost("the session has ended", sandbox_id="")
        started = time.monotonic()
        self.token = token = secrets.token_hex(8)
        pre, cmd = prelude.encode(), command.encode()
        head = f"R {token} {int(timeout_s * 1000)} {max_output_bytes} {int(keep)} {len(pre)} {len(cmd)}\n"
        out, err = Capture(max_output_bytes), Capture(max_output_bytes)
        done = False
        try:
            with anyio.move_on_after(timeout_s + DRIVER_GRACE_S):
                await self._write(head.encode() + pre + cmd)
                result = await self._collect(out, err)
                done = True
        except SessionLost as exc:
            exc.stdout, exc.stderr = out, err
            raise
        finally:
            self.token = ""
            if not done:  # cancelled, timed out or broken mid-command: the framing is lost
                await self.close()
        if not done:
            lost = SessionLost("the session stopped answering")
            lost.stdout, lost.stderr = out, err
            raise lost
        status, timed, out_total, err_total, oom, ran = result
        out.total, err.total = max(out_total, out.total), max(err_total, err.total)
        return SessionOutcome(
            exit_code=status,
            stdout=out,
            stderr=err,
            timed_out=bool(timed),
            oom_kills=oom if oom >= 0 else None,
            started=ran > 0,
            prepared=ran >= 0,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    async def _collect(self, out: Capture, err: Capture) -> list[int]:
        """Read frames until the command's ``x`` frame; head frames fill ``head``, tail frames ``tail``."""
        while True:
            kind, data = await self._frame()
            if kind == b"x":
                return [int(v) for v in data.split()]
            target = out if kind in (b"o", b"O") else err
            part = target.head if kind.islower() else target.tail
            part += data
            target.total += len(data)

    async def signal(self, *, kill: bool = False) -> bool:
        """SIGINT (or SIGKILL) the running command's process group; False if none was running."""
        token = self.token
        if not token or not self.alive:
            return False
        await self._write(f"{'K' if kill else 'I'} {token}\n".encode())
        return True

    async def close(self) -> None:
        """End the driver (EOF on its stdin: it kills what still runs and exits)."""
        self.alive = False
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception as exc:  # noqa: BLE001  (a broken stream is closed enough)
                log.debug("session.close_failed", session=self.session_id, error=str(exc))

    def abandon(self) -> None:
        """Drop the stream without awaiting anything (its container is being removed anyway)."""
        self.alive = False
        resp = getattr(self.stream, "_resp", None)
        self.stream._closed = True
        if resp is not None:
            resp.close()

    # -- framing --
    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.write_in(data)
        except (RuntimeError, OSError, AttributeError, AssertionError) as exc:
            self.alive = False
            raise SessionLost(f"the session's stdin is closed ({exc})") from exc

    async def _fill(self) -> None:
        while True:
            try:
                msg = await self.stream.read_out()
            except (OSError, RuntimeError, aiohttp.ClientError) as exc:
                msg = None
                log.debug("session.read_failed", session=self.session_id, error=str(exc))
            if msg is None:
                self.alive = False
                raise SessionLost("the session's driver exited")
            if msg.stream == 1:
                self._buf += msg.data
                return
            log.warning(
                "session.driver_stderr", session=self.session_id, text=msg.data[:500].decode(errors="replace")
            )

    async def _frame(self) -> tuple[bytes, bytes]:
        while (nl := self._buf.find(b"\n")) < 0:
            await self._fill()
        kind, _, size = bytes(self._buf[:nl]).partition(b" ")
        end = nl + 1 + int(size)
        while len(self._buf) < end:
            await self._fill()
        data = bytes(self._buf[nl + 1 : end])
        del self._buf[:end]
        return kind, data
