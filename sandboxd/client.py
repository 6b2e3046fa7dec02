"""SandboxClient: the typed caller side of sandboxd's NATS request/reply API."""

from __future__ import annotations

import re
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
    WriteFileRequest,
    reply_decoder,
)

CREATE_SUBJECT = "rs.sandbox.create"
SANDBOX_ID_RE = re.compile(r"^([A-Za-z0-9_-]+):[0-9a-f]{12}$")
EXEC_SLACK_S = 15.0  # beyond the command's own timeout: container start-up of the exec, kill sweep

R = TypeVar("R", Created, ExecResult, FileData, Done, SessionOpened)
_encoder = msgspec.msgpack.Encoder()


def owner_of(sandbox_id: str) -> str:
    """The sandboxd instance that owns ``sandbox_id`` (``<owner>:<12 hex>``)."""
    m = SANDBOX_ID_RE.match(sandbox_id)
    if m is None:
        raise SandboxBadRequest(f"malformed sandbox_id {sandbox_id!r}: expected '<owner>:<12 hex>'")
    return m.group(1)


class SandboxClient:
    """Create sandboxes and act in them through whichever sandboxd instances are running.

    A limit left as None takes the daemon's default. Every failure raises a ``SandboxError``.
    """

    def __init__(self, nc: NATS, *, request_timeout_s: float = 60.0) -> None:
        self.nc = nc
        self.request_timeout_s = request_timeout_s

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
        )
        return await self._call(CREATE_SUBJECT, req, Created)

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
        try:
            await self._call(self._subject(sandbox_id, "close"), CloseRequest(sandbox_id=sandbox_id), Done)
        except (SandboxNotFound, _NoResponders):
            return  # a dead owner's containers are removed by the reaper of any live instance

    async def keepalive(self, sandbox_id: str, ttl_s: float) -> None:
        req = KeepaliveRequest(sandbox_id=sandbox_id, ttl_s=ttl_s)
        await self._call(self._subject(sandbox_id, "keepalive"), req, Done)

    async def write_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        req = WriteFileRequest(sandbox_id=sandbox_id, path=path, data=data, mode=mode)
        await self._call(self._subject(sandbox_id, "write"), req, Done)

    async def read_file(self, sandbox_id: str, path: str, max_bytes: int = 1 << 20) -> bytes:
        req = ReadFileRequest(sandbox_id=sandbox_id, path=path, max_bytes=max_bytes)
        return (await self._call(self._subject(sandbox_id, "read"), req, FileData)).data

    # -- sessions: a resident shell whose cwd and exports carry over between commands --
    async def session_open(
        self, sandbox_id: str, *, cwd: str = "/work", env: dict[str, str] | None = None
    ) -> str:
        """Start a persistent shell in the sandbox; returns its session id."""
        req = SessionOpenRequest(sandbox_id=sandbox_id, cwd=cwd, env=dict(env or {}))
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
            session_id=session_id,
            command=command,
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
        )
        timeout = max(self.request_timeout_s, timeout_s + EXEC_SLACK_S)
        return await self._call(self._subject(sandbox_id, "session"), req, ExecResult, timeout_s=timeout)

    async def session_interrupt(self, sandbox_id: str, session_id: str, *, kill: bool = False) -> None:
        """SIGINT (SIGKILL with ``kill``) the session's running command; a no-op when it is idle."""
        req = SessionInterruptRequest(sandbox_id=sandbox_id, session_id=session_id, kill=kill)
        await self._call(self._subject(sandbox_id, "session"), req, Done)

    async def session_close(self, sandbox_id: str, session_id: str) -> None:
        """End the session (what still runs in it is killed); closing twice is fine."""
        req = SessionCloseRequest(sandbox_id=sandbox_id, session_id=session_id)
        await self._call(self._subject(sandbox_id, "session"), req, Done)

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
