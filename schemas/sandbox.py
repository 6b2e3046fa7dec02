"""sandboxd's request/reply API over core NATS (client <-> sandboxd).

Subjects: ``rs.sandbox.create`` (queue group ``sandboxd``: any instance may create), then
``rs.sandbox.<owner>.<op>`` for a sandbox's operations (only its owner instance answers); the op
in the subject must be the one of the request's kind (``OPS``), so broker permissions on subjects
are permissions on operations. Every reply is ``SandboxReply``: one result, or a ``SandboxFault``.

Authorisation: ``create`` returns a capability ``token``; every later request about that sandbox
carries it (``token``), except ``verify``, which the broker grants only to the roles whose output is
the reward (reward, learner). Tokens never go into a record that reaches the lake.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorKind = Literal[
    "timeout", "oom", "not_found", "capacity", "startup_failed", "bad_request", "forbidden", "internal"
]


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
    # bounds, and the size of /work in MiB (0: the default); cpus, memory_mb and work_mb above the
    # instance's max_cpus, max_memory_mb and max_work_mb are refused (sandboxd/limits.py).
    writable_root: bool = False
    work_mb: int = 0
    # A read-only /run/rollstream where the agent runner's proxy listens on a unix socket: the only
    # route out of the sandbox (sandboxd/model_socket.py); refused unless sandboxd enables it.
    model_socket: bool = False


class ExecRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.exec.v1", tag_field="kind"):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    command: str
    cwd: str = "/work"
    env: dict[str, str] = {}
    timeout_s: float = 10.0
    max_output_bytes: int = 16384


class CloseRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.close.v1", tag_field="kind"):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned


class KeepaliveRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.keepalive.v1", tag_field="kind"):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    ttl_s: float = 900.0


class WriteFileRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.write.v1", tag_field="kind"):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    path: str
    data: bytes
    mode: int = 0o644


class ReadFileRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.read.v1", tag_field="kind"):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    path: str
    max_bytes: int = 1 << 20


class SessionOpenRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_open.v1", tag_field="kind"
):
    """Start a persistent shell in a sandbox: its cwd and exported variables carry over between runs."""

    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    cwd: str = "/work"
    env: dict[str, str] = {}


class SessionRunRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_run.v1", tag_field="kind"
):
    """Run one command in a session (replies ``ExecResult``); commands of one session run one at a time."""

    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    session_id: str
    command: str
    timeout_s: float = 10.0
    max_output_bytes: int = 16384


class SessionInterruptRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_interrupt.v1", tag_field="kind"
):
    """SIGINT the process group of the session's running command; with ``kill``, SIGKILL every
    process of the agent uid in the sandbox (what a timeout does)."""

    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    session_id: str
    kill: bool = False


class SessionCloseRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="sbx.session_close.v1", tag_field="kind"
):
    sandbox_id: str
    token: str = ""  # the capability ``create`` returned
    session_id: str


class VerifyRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.verify.v1", tag_field="kind"):
    """End the agent, then run ``commands`` (in order, stopping at the first failure) as the verifier
    uid through fresh ``docker exec``s, never through a channel the agent's processes could reach.

    First every process of the agent uid is killed and no agent operation is accepted any more
    (the sandbox is sealed); then ``clear`` and ``files`` are placed; then each command runs with
    a clean environment in ``cwd``; then
    ``result_path`` (if given) is read as the verifier. ``close`` removes the sandbox afterwards.
    No token: the broker grants the ``verify`` subject only to the reward-producing roles.
    """

    sandbox_id: str
    commands: list[str]
    timeout_s: float = 30.0  # per command
    max_output_bytes: int = 4096  # per stream and command
    cwd: str = "/work"
    env: dict[str, str] = {}
    result_path: str = ""  # a file the verifier reads after the commands (a graded reward)
    close: bool = True
    # Imported tasks' test files (consumers/task_verify.py), placed after the seal and before the
    # commands through fresh ``docker exec``s: each ``clear`` directory is removed and made anew by
    # root, empty and writable by the verifier; then each of ``files`` (path -> bytes) is written,
    # readable by all (``.sh`` files executable): by root inside a ``clear`` directory, elsewhere
    # (the task's working directory) as the agent uid, whose processes are all dead by then.
    clear: list[str] = []
    files: dict[str, bytes] = {}


class InspectRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.inspect.v1", tag_field="kind"):
    """Run ``command`` as root through a fresh ``docker exec`` with a clean environment, beside the
    agent's live processes and without sealing the sandbox: how the reward group probes what the
    agent left running before ``verify`` ends it. Its output travels on that exec's own stream,
    which no agent process can reach. No token: like ``verify``, the broker grants ``inspect`` only
    to the reward-producing roles. Replies with an ``ExecResult``."""

    sandbox_id: str
    command: str
    timeout_s: float = 10.0
    max_output_bytes: int = 65536


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
    | VerifyRequest
    | InspectRequest
)

# The op (last subject token) that each request kind travels on; any other pairing is refused.
OPS: dict[type, str] = {
    ExecRequest: "exec",
    CloseRequest: "close",
    KeepaliveRequest: "keepalive",
    WriteFileRequest: "write",
    ReadFileRequest: "read",
    SessionOpenRequest: "session",
    SessionRunRequest: "session",
    SessionInterruptRequest: "session",
    SessionCloseRequest: "session",
    VerifyRequest: "verify",
    InspectRequest: "inspect",
}


class Created(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.created.v1", tag_field="kind"):
    sandbox_id: str
    owner: str
    image: str
    startup_ms: float
    token: str = ""  # the capability every later request about this sandbox must carry; secret
    container: str = ""  # the Docker container's name, ``rs-<scope>-<12 hex>``
    model_socket_dir: str = ""  # host directory mounted at /run/rollstream (``model_socket`` only)


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


class VerifyResult(msgspec.Struct, frozen=True, kw_only=True, tag="sbx.verify_result.v1", tag_field="kind"):
    """What ``verify`` found: ``passed`` iff every command exited 0 (none timed out)."""

    passed: bool
    results: list[ExecResult]  # one per command run, in order (the first failure is the last)
    result_data: bytes | None = None  # ``result_path``'s bytes (None: not asked, or unreadable)
    agent_processes: int = 0  # agent processes still alive when verification began, all killed
    seal_ms: float = 0.0  # time to end the agent before the first command


SandboxReply = Created | ExecResult | FileData | Done | SandboxFault | SessionOpened | VerifyResult

request_decoder = msgspec.msgpack.Decoder(SandboxRequest)
reply_decoder = msgspec.msgpack.Decoder(SandboxReply)
