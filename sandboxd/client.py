"""SandboxClient: the typed caller side of sandboxd's NATS request/reply API."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from sandboxd.errors import FAULT_ERRORS, SandboxBadRequest, SandboxError, SandboxNotFound, SandboxUnavailable
from schemas.sandbox import (
    CloseRequest,
    Created,
    CreateRequest,
    Done,
    ExecRequest,
    ExecResult,
    FileData,
    InspectRequest,
    KeepaliveRequest,
    ReadFileRequest,
    SandboxFault,
    SandboxReply,
    SandboxRequest,
    SessionCloseRequest,
    SessionInterruptRequest,
    SessionOpened,
    SessionOpenRequest,
    SessionRunRequest,
    VerifyRequest,
    VerifyResult,
    WriteFileRequest,
    reply_decoder,
)

CREATE_SUBJECT = "rs.sandbox.create"
SANDBOX_ID_RE = re.compile(r"^([A-Za-z0-9_-]+):[0-9a-f]{12}$")
EXEC_SLACK_S = 15.0  # beyond the command's own timeout: container start-up of the exec, kill sweep
SEAL_SLACK_S = 60.0  # verify: ending the agent's operations and processes before the first command
MAX_TOKENS = 16384  # capability tokens a client remembers (oldest forgotten first)

R = TypeVar("R", Created, ExecResult, FileData, Done, SessionOpened, VerifyResult)
_encoder = msgspec.msgpack.Encoder()


def owner_of(sandbox_id: str) -> str:
    """The sandboxd instance that owns ``sandbox_id`` (``<owner>:<12 hex>``)."""
    m = SANDBOX_ID_RE.match(sandbox_id)
    if m is None:
        raise SandboxBadRequest(f"malformed sandbox_id {sandbox_id!r}: expected '<owner>:<12 hex>'")
    return m.group(1)


class SandboxClient:
    """Create sandboxes and act in them through whichever sandboxd instances are running.

    The client keeps the capability token of every sandbox it created (``create`` returns it) and
    sends it with each request about that sandbox; a sandbox created elsewhere is usable only after
    ``adopt`` with its token. ``verify`` needs no token (the broker grants it to reward roles).
    A limit left as None takes the daemon's default. Every failure raises a ``SandboxError``.
    """

    def __init__(self, nc: NATS, *, request_timeout_s: float = 60.0) -> None:
        self.nc = nc
        self.request_timeout_s = request_timeout_s
        self._tokens: OrderedDict[str, str] = OrderedDict()

    def adopt(self, sandbox_id: str, token: str) -> None:
        """Use ``sandbox_id`` with ``token`` (from its ``Created``) through this client."""
        self._tokens[sandbox_id] = token
        self._tokens.move_to_end(sandbox_id)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)

    def token_of(self, sandbox_id: str) -> str:
        """The token this client holds for ``sandbox_id`` ("" if none: sandboxd will refuse)."""
        return self._tokens.get(sandbox_id, "")

    async def create(
        self,
        environment: str = "base",
        *,
        image: str = "",
        memory_mb: int | None = None,
        pids: int | None = None,
        cpus: float | None = None,
        ttl_s: float | None = None,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        writable_root: bool = False,
        work_mb: int = 0,
        model_socket: bool = False,
    ) -> Created:
        req = CreateRequest(
            environment=environment,
            image=image,
            memory_mb=memory_mb or 0,
            pids=pids or 0,
            cpus=cpus or 0.0,
            ttl_s=ttl_s or 0.0,
            labels=dict(labels or {}),
            env=dict(env or {}),
            writable_root=writable_root,
            work_mb=work_mb,
            model_socket=model_socket,
        )
        created = await self._call(CREATE_SUBJECT, req, Created)
        self.adopt(created.sandbox_id, created.token)
        return created

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = 10.0,
        cwd: str = "/work",
        env: dict[str, str] | None = None,
        max_output_bytes: int = 16384,
    ) -> ExecResult:
        """Run ``command`` with bash; past ``timeout_s`` it returns ``timed_out=True`` (not an error)."""
        req = ExecRequest(
            sandbox_id=sandbox_id,
            token=self.token_of(sandbox_id),
            command=command,
            cwd=cwd,
            env=dict(env or {}),
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
        )
        timeout = max(self.request_timeout_s, timeout_s + EXEC_SLACK_S)
        return await self._call(self._subject(sandbox_id, "exec"), req, ExecResult, timeout_s=timeout)

    async def close(self, sandbox_id: str) -> None:
        """Remove the sandbox. Closing a sandbox that is already gone (or whose owner is gone) is fine."""
        req = CloseRequest(sandbox_id=sandbox_id, token=self.token_of(sandbox_id))
        try:
            await self._call(self._subject(sandbox_id, "close"), req, Done)
        except (SandboxNotFound, _NoResponders):
            pass  # a dead owner's containers are removed by the reaper of any live instance
        self._tokens.pop(sandbox_id, None)

    async def keepalive(self, sandbox_id: str, ttl_s: float) -> None:
        req = KeepaliveRequest(sandbox_id=sandbox_id, token=self.token_of(sandbox_id), ttl_s=ttl_s)
        await self._call(self._subject(sandbox_id, "keepalive"), req, Done)

    async def write_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        req = WriteFileRequest(
            sandbox_id=sandbox_id, token=self.token_of(sandbox_id), path=path, data=data, mode=mode
        )
        await self._call(self._subject(sandbox_id, "write"), req, Done)

    async def read_file(self, sandbox_id: str, path: str, max_bytes: int = 1 << 20) -> bytes:
        req = ReadFileRequest(
            sandbox_id=sandbox_id, token=self.token_of(sandbox_id), path=path, max_bytes=max_bytes
        )
        return (await self._call(self._subject(sandbox_id, "read"), req, FileData)).data

    # -- sessions: a resident shell whose cwd and exports carry over between commands --
    async def session_open(
        self, sandbox_id: str, *, cwd: str = "/work", env: dict[str, str] | None = None
    ) -> str:
        """Start a persistent shell in the sandbox; returns its session id."""
        req = SessionOpenRequest(
            sandbox_id=sandbox_id, token=self.token_of(sandbox_id), cwd=cwd, env=dict(env or {})
        )
        return (await self._call(self._subject(sandbox_id, "session"), req, SessionOpened)).session_id

    async def session_run(
        self,
        sandbox_id: str,
        session_id: str,
        command: str,
        *,
        timeout_s: float = 10.0,
        max_output_bytes: int = 16384,
    ) -> ExecResult:
        """Run ``command`` in the session (its own process group); timeouts return ``timed_out=True``."""
        req = SessionRunRequest(
            sandbox_id=sandbox_id,
            token=self.token_of(sandbox_id),
            session_id=session_id,
            command=command,
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
        )
        timeout = max(self.request_timeout_s, timeout_s + EXEC_SLACK_S)
        return await self._call(self._subject(sandbox_id, "session"), req, ExecResult, timeout_s=timeout)

    async def session_interrupt(self, sandbox_id: str, session_id: str, *, kill: bool = False) -> None:
        """SIGINT the session's running command (with ``kill``: SIGKILL every agent process in the
        sandbox, as a timeout does); a no-op when it is idle."""
        req = SessionInterruptRequest(
            sandbox_id=sandbox_id, token=self.token_of(sandbox_id), session_id=session_id, kill=kill
        )
        await self._call(self._subject(sandbox_id, "session"), req, Done)

    async def session_close(self, sandbox_id: str, session_id: str) -> None:
        """End the session (what still runs in it is killed); closing twice is fine."""
        req = SessionCloseRequest(
            sandbox_id=sandbox_id, token=self.token_of(sandbox_id), session_id=session_id
        )
        await self._call(self._subject(sandbox_id, "session"), req, Done)

    # -- verification (reward roles) --
    async def inspect(
        self, sandbox_id: str, command: str, *, timeout_s: float = 10.0, max_output_bytes: int = 65536
    ) -> ExecResult:
        """Run ``command`` as root beside the agent's processes, without sealing (``InspectRequest``)."""
        req = InspectRequest(
            sandbox_id=sandbox_id, command=command, timeout_s=timeout_s, max_output_bytes=max_output_bytes
        )
        timeout = max(self.request_timeout_s, timeout_s + EXEC_SLACK_S)
        return await self._call(self._subject(sandbox_id, "inspect"), req, ExecResult, timeout_s=timeout)

    async def verify(
        self,
        sandbox_id: str,
        commands: list[str],
        *,
        timeout_s: float = 30.0,
        max_output_bytes: int = 4096,
        cwd: str = "/work",
        env: dict[str, str] | None = None,
        result_path: str = "",
        close: bool = True,
        clear: list[str] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> VerifyResult:
        """End the agent in the sandbox, then run ``commands`` as the verifier (see ``VerifyRequest``);
        with ``close`` the sandbox is removed afterwards, whatever happened."""
        req = VerifyRequest(
            sandbox_id=sandbox_id,
            commands=list(commands),
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
            cwd=cwd,
            env=dict(env or {}),
            result_path=result_path,
            close=close,
            clear=list(clear or []),
            files=dict(files or {}),
        )
        timeout = max(self.request_timeout_s, len(commands) * (timeout_s + EXEC_SLACK_S) + SEAL_SLACK_S)
        try:
            return await self._call(self._subject(sandbox_id, "verify"), req, VerifyResult, timeout_s=timeout)
        finally:
            if close:
                self._tokens.pop(sandbox_id, None)

    # -- plumbing --
    @staticmethod
    def _subject(sandbox_id: str, op: str) -> str:
        return f"rs.sandbox.{owner_of(sandbox_id)}.{op}"

    async def _call(
        self, subject: str, req: SandboxRequest, expect: type[R], *, timeout_s: float | None = None
    ) -> R:
        sandbox_id = getattr(req, "sandbox_id", "")
        timeout = timeout_s or self.request_timeout_s
        try:
            msg = await self.nc.request(subject, _encoder.encode(req), timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise _NoResponders(f"no sandboxd answers on {subject}", sandbox_id=sandbox_id) from exc
        except nats.errors.TimeoutError as exc:
            raise SandboxUnavailable(
                f"no reply on {subject} within {timeout:.0f}s", sandbox_id=sandbox_id
            ) from exc
        try:
            reply: SandboxReply = reply_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise SandboxError(f"undecodable reply on {subject}: {exc}", sandbox_id=sandbox_id) from exc
        if isinstance(reply, SandboxFault):
            raise FAULT_ERRORS[reply.error](reply.message, sandbox_id=sandbox_id)
        if not isinstance(reply, expect):
            raise SandboxError(f"expected {expect.__name__} on {subject}, got {type(reply).__name__}")
        return reply


class _NoResponders(SandboxUnavailable):
    """No sandboxd instance is subscribed to the subject (a dead owner, or none running)."""
