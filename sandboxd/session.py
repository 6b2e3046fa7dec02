"""Persistent sessions: one long-lived ``docker exec`` per session running the driver of
``session_driver`` (as root) whose shell runs the agent's commands (as the agent uid); a command is
one request line on the driver's stdin and a few frames on its stdout.

Frames are authenticated: each carries a sequence number and an HMAC under a key only sandboxd and
the driver know (sent on the driver's stdin, which no agent process can read), and each is bounded
in size. Any frame that fails these checks, or a driver that floods its stderr, ends the session
with ``SessionCorrupt``: nothing it said is taken as a result.

``Session.run`` returns a ``SessionOutcome``; a session whose driver died (or that stopped answering)
raises ``SessionLost`` and is dead for good: the caller decides what that means for the sandbox.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import shlex
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import aiodocker
import aiohttp
import anyio
import msgspec
import structlog

from sandboxd.docker_ops import Capture
from sandboxd.errors import SandboxBadRequest, SandboxError, SandboxNotFound
from sandboxd.limits import ENV_NAME_RE
from sandboxd.session_driver import DRIVER, EXECUTOR
from sandboxd.users import AGENT_GID, AGENT_HOME, AGENT_UID, AGENT_USER

DRIVER_GRACE_S = 10.0  # beyond a command's timeout: the driver's own kill (2 s) and give-up (3 s) bounds
OPEN_TIMEOUT_S = 30.0
SEAL_TIMEOUT_S = 15.0
SESSION_DIR = "/dev/shm/.rs-"  # its own tmpfs: a full /work or /tmp does not stop the session
# Starts bash as the driver's executor from a file, so `ps` shows neither script in full.
BOOT = (
    "$0 = 'sandboxd-session'; umask 022; my ($d, $x) = @ARGV; mkdir($d, 0711) or die \"mkdir $d: $!\";"
    " open(my $f, '>', \"$d/x\") or die $!; print $f $x; close $f; $ARGV[1] = '. \"$1/x\"';"
    " my $code = delete $ENV{RS_DRIVER}; eval $code; die $@ if $@;"
)
FRAME_RE = re.compile(rb"([hoeOExz]) (\d{1,12}) (\d{1,10}) ([0-9a-f]{32})")
MAX_HEADER = 80
MAX_FRAME = 1 << 16  # o/e frames are reads of at most 64 KiB; a tail frame at most the command's cap
MAX_DRIVER_STDERR = 4096  # bytes of driver stderr logged per session; more is a protocol violation

log = structlog.get_logger()


class SessionLost(SandboxError):
    """The session's driver is gone (killed by a command, or its container died)."""

    stdout: Capture | None = None  # what the command had printed when the session was lost
    stderr: Capture | None = None


class SessionCorrupt(SessionLost):
    """The driver's output broke the protocol (bad MAC, sequence, size, or a stderr flood)."""


class SessionOutcome(msgspec.Struct, kw_only=True):
    exit_code: int
    stdout: Capture
    stderr: Capture
    timed_out: bool
    oom_kills: int | None  # the cgroup's OOM-kill counter after a SIGKILLed command, else None
    started: bool  # False: the command never ran (no process slot, no room for its files)
    prepared: bool  # False: the driver could not write the command's files (nothing was tried)
    shell_died: bool  # the command killed its shell (restarted before the next command)
    duration_ms: float


def exec_prelude(cwd: str, env: Mapping[str, str]) -> str:
    """Shell lines that give a one-off command its cwd and environment (what ``docker exec`` would)."""
    bad = [k for k in env if not ENV_NAME_RE.fullmatch(k)]
    if bad:
        raise SandboxBadRequest(f"env names must be shell identifiers, got {bad!r}")
    lines = [f"cd -- {shlex.quote(cwd)} || exit 126"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


class Session:
    """One driver process in one container; runs one command at a time (callers hold ``lock``)."""

    def __init__(self, session_id: str, stream: Any, key: str) -> None:
        self.session_id = session_id
        self.stream = stream
        self.lock = anyio.Lock()
        self.alive = True
        self.token = ""  # the running command's token ("" when idle)
        self.driver_pid = 0  # in the container's pid namespace (from the hello frame)
        self._key = key.encode()
        self._seq = 0
        self._buf = bytearray()
        self._stderr_bytes = 0
        self._max_frame = MAX_FRAME

    @classmethod
    async def open(
        cls,
        docker: aiodocker.Docker,
        container_id: str,
        *,
        cwd: str = AGENT_HOME,
        env: Mapping[str, str] | None = None,
        keep: bool = False,
        session_id: str = "",
    ) -> Session:
        """Start the driver in ``container_id`` (needs ``perl`` and ``bash`` in the image); its shell
        starts in ``cwd`` with ``env``; ``keep``: its cwd and exports carry over between commands."""
        session_id = session_id or f"s-{secrets.token_hex(8)}"
        state = f"{SESSION_DIR}{session_id}.state" if keep else ""
        argv = ["perl", "-e", BOOT, SESSION_DIR + session_id, EXECUTOR, str(AGENT_UID), str(AGENT_GID)]
        argv += [state, AGENT_HOME, AGENT_USER]
        init = exec_prelude(cwd, env or {}).encode()
        key = secrets.token_hex(32)
        with anyio.fail_after(OPEN_TIMEOUT_S):
            stream = await _start(docker, container_id, argv)
            session = cls(session_id, stream, key)
            await session._write(f"S {key} {len(init)}\n".encode() + init)
            kind, data = await session._frame()
            if kind != b"h":
                await session.close()
                raise SessionCorrupt(f"the session's driver greeted with {kind!r}")
            session.driver_pid = int(data)
        return session

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
        self._max_frame = max(MAX_FRAME, max_output_bytes)
        done = False
        try:
            with anyio.move_on_after(timeout_s + DRIVER_GRACE_S):
                await self._write(head.encode() + pre + cmd)
                result = await self._collect(token, out, err)
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
        status, timed, out_total, err_total, oom, ran, shell = result
        out.total, err.total = max(out_total, out.total), max(err_total, err.total)
        return SessionOutcome(
            exit_code=status,
            stdout=out,
            stderr=err,
            timed_out=bool(timed),
            oom_kills=oom if oom >= 0 else None,
            started=ran > 0,
            prepared=ran >= 0,
            shell_died=bool(shell),
            duration_ms=(time.monotonic() - started) * 1000,
        )

    async def _collect(self, token: str, out: Capture, err: Capture) -> list[int]:
        """Read frames until the command's ``x`` frame; head frames fill ``head``, tail frames ``tail``."""
        while True:
            kind, data = await self._frame()
            if kind == b"x":
                fields = data.split()
                if len(fields) != 8 or fields[0] != token.encode():
                    raise SessionCorrupt(f"the result frame does not answer command {token}")
                return [int(v) for v in fields[1:]]
            if kind not in (b"o", b"e", b"O", b"E"):
                raise SessionCorrupt(f"unexpected {kind!r} frame during a command")
            target = out if kind in (b"o", b"O") else err
            part, cap = (target.head, target.head_cap) if kind.islower() else (target.tail, target.tail_cap)
            if len(part) + len(data) > cap:
                raise SessionCorrupt(f"the driver sent more {kind.decode()!r} bytes than the cap of {cap}")
            part += data
            target.total += len(data)

    async def seal(self) -> tuple[int, int]:
        """Kill every process of the agent uid (caller holds ``lock``; the session is idle);
        returns (how many there were, besides the session's own shell; how many are left)."""
        nonce = secrets.token_hex(8)
        with anyio.fail_after(SEAL_TIMEOUT_S):
            await self._write(f"Z {nonce}\n".encode())
            kind, data = await self._frame()
        fields = data.split()
        if kind != b"z" or len(fields) != 3 or fields[0] != nonce.encode():
            raise SessionCorrupt("the seal was not answered")
        return int(fields[1]), int(fields[2])

    async def signal(self, *, kill: bool = False) -> bool:
        """SIGINT the running command's process group (or, with ``kill``, SIGKILL every agent
        process); False if no command was running."""
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
            self._driver_stderr(msg.data)

    def _driver_stderr(self, data: bytes) -> None:
        """Log what the driver says on stderr, up to a budget; a flood ends the session."""
        if self._stderr_bytes < MAX_DRIVER_STDERR:
            text = data[: MAX_DRIVER_STDERR - self._stderr_bytes].decode(errors="replace")
            log.warning("session.driver_stderr", session=self.session_id, text=text)
        self._stderr_bytes += len(data)
        if self._stderr_bytes > MAX_DRIVER_STDERR:
            self.alive = False
            raise SessionCorrupt(f"the session's driver wrote more than {MAX_DRIVER_STDERR} bytes to stderr")

    async def _frame(self) -> tuple[bytes, bytes]:
        """The next authenticated frame; any violation ends the session (``SessionCorrupt``)."""
        while (nl := self._buf.find(b"\n", 0, MAX_HEADER)) < 0:
            if len(self._buf) >= MAX_HEADER:
                self._corrupt("a frame header is too long")
            await self._fill()
        head = bytes(self._buf[:nl])
        m = FRAME_RE.fullmatch(head)
        if m is None:
            self._corrupt("a frame header is malformed")
        kind, seq, size, mac = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if size > self._max_frame:
            self._corrupt(f"a frame claims {size} bytes (at most {self._max_frame})")
        if seq != self._seq:
            self._corrupt(f"frame {seq} arrived where {self._seq} was due")
        end = nl + 1 + size
        while len(self._buf) < end:
            await self._fill()
        data = bytes(self._buf[nl + 1 : end])
        signed = head[: m.start(4) - 1] + b"\n" + data
        want = hmac.new(self._key, signed, hashlib.sha256).hexdigest()[:32].encode()
        if not hmac.compare_digest(want, mac):
            self._corrupt(f"frame {seq} fails authentication")
        del self._buf[:end]
        self._seq += 1
        return kind, data

    def _corrupt(self, why: str) -> NoReturn:
        self.alive = False
        self._buf.clear()
        raise SessionCorrupt(f"session protocol violation: {why}; the session is closed")


async def _start(docker: aiodocker.Docker, container_id: str, argv: list[str]) -> Any:
    """The driver's exec stream, attached (root; its environment holds only its own source)."""
    container = docker.containers.container(container_id)
    environment = {"RS_DRIVER": DRIVER}
    try:
        exe = await container.exec(argv, stdin=True, environment=environment, workdir="/", user="0:0")
        stream = exe.start(detach=False)
        await stream._init()  # attach now: the driver blocks on its stdin until our first line
    except aiodocker.DockerError as exc:
        if exc.status in (404, 409):
            raise SandboxNotFound(f"container is gone or not running ({exc.message})") from exc
        raise SandboxError(f"cannot start a session: {exc.message}") from exc
    return stream
