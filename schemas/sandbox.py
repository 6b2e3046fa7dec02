"""sandboxd's request/reply API over core NATS (client <-> sandboxd).

Subjects: ``rs.sandbox.create`` (queue group ``sandboxd``: any instance may create), then
``rs.sandbox.<owner>.<op>`` for a sandbox's operations (only its owner instance answers).
Every reply is ``SandboxReply``: either ``ok`` with one result, or an error ``kind``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorKind = Literal["timeout", "oom", "not_found", "capacity", "startup_failed", "bad_request", "internal"]


class CreateRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.create.v1", tag_field="kind"):
    environment: str = "base"
    image: str = ""  # explicit image tag; overrides ``environment``
    cpus: float = 1.0
    memory_mb: int = 512
    pids: int = 256
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    ttl_s: float = 900.0
    # Imported tasks (sandboxd/rootfs.py): a writable copy-on-write root whose layer sandboxd
    # bounds, and the size of /work in MiB (0: the default); cpus, memory_mb and work_mb are
    # clamped to the instance's max_cpus, max_memory_mb and max_work_mb.
    writable_root: bool = False
    work_mb: int = 0


class ExecRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.exec.v1", tag_field="kind"):
    sandbox_id: str
    command: str
    cwd: str = "/work"
    env: dict[str, str] = {}
    timeout_s: float = 10.0
    max_output_bytes: int = 16384


class CloseRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.close.v1", tag_field="kind"):
    sandbox_id: str


class KeepaliveRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.keepalive.v1", tag_field="kind"):
    sandbox_id: str
    ttl_s: float = 900.0


class WriteFileRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.write.v1", tag_field="kind"):
    sandbox_id: str
    path: str
    data: bytes
    mode: int = 0o644


class ReadFileRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.read.v1", tag_field="kind"):
    sandbox_id: str
    path: str
    max_bytes: int = 1 << 20


class SessionOpenRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_open.v1", tag_field="kind"
):
    """Start a persistent shell in a sandbox: its cwd and exported variables carry over between runs."""

    sandbox_id: str
    cwd: str = "/work"
    env: dict[str, str] = {}


class SessionRunRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_run.v1", tag_field="kind"
):
    """Run one command in a session (replies ``ExecResult``); commands of one session run one at a time."""

    sandbox_id: str
    session_id: str
    command: str
    timeout_s: float = 10.0
    max_output_bytes: int = 16384


class SessionInterruptRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_interrupt.v1", tag_field="kind"
):
    """SIGINT (or, with ``kill``, SIGKILL) the process group of the session's running command."""

    sandbox_id: str
    session_id: str
    kill: bool = False


class SessionCloseRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_close.v1", tag_field="kind"
):
    sandbox_id: str
    session_id: str


SandboxRequest = (
    CreateRequest
    | ExecRequest
    | CloseRequest
    | KeepaliveRequest
    | WriteFileRequest
    | ReadFileRequest
    | SessionOpenRequest
    | SessionRunRequest
    | SessionInterruptRequest
    | SessionCloseRequest
)


class Created(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.created.v1", tag_field="kind"):
    sandbox_id: str
    owner: str
    image: str
    startup_ms: float


class ExecResult(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.exec_result.v1", tag_field="kind"):
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool = False
    timed_out: bool = False
    oom_killed: bool = False
    duration_ms: float = 0.0


class FileData(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.file.v1", tag_field="kind"):
    path: str
    data: bytes
    truncated: bool = False


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.done.v1", tag_field="kind"):
    pass


class SandboxFault(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.fault.v1", tag_field="kind"):
    error: ErrorKind
    message: str


class SessionOpened(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_opened.v1", tag_field="kind"):
    sandbox_id: str
    session_id: str


SandboxReply = Created | ExecResult | FileData | Done | SandboxFault | SessionOpened

request_decoder = msgspec.msgpack.Decoder(SandboxRequest)
reply_decoder = msgspec.msgpack.Decoder(SandboxReply)
