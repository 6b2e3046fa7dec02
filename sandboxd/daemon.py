"""The sandboxd daemon: serves ``rs.sandbox.create`` (queue group ``sandboxd``) and this
instance's ``rs.sandbox.<owner>.<op>`` subjects, one task per request.
"""

from __future__ import annotations

import posixpath
import secrets
import time
from typing import Any

import anyio
import msgspec
import nats.errors
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sandboxd import envhub, reaper
from sandboxd.docker_ops import DockerOps, ExecOutcome, container_config
from sandboxd.errors import (
    EnvHubError,
    SandboxBadRequest,
    SandboxCapacity,
    SandboxError,
    SandboxNotFound,
    SandboxOOM,
    SandboxStartupFailed,
    SandboxTimeout,
)
from sandboxd.settings import SandboxdSettings
from schemas.sandbox import (
    CloseRequest,
    Created,
    CreateRequest,
    Done,
    ErrorKind,
    ExecRequest,
    ExecResult,
    FileData,
    KeepaliveRequest,
    ReadFileRequest,
    SandboxFault,
    SandboxReply,
    SandboxRequest,
    WriteFileRequest,
    request_decoder,
)

CREATE_SUBJECT = "rs.sandbox.create"
QUEUE = "sandboxd"
EXEC_GRACE_S = 5.0  # output stream may outlive `timeout` (a background child holds it): then we kill
FILE_OP_DEADLINE_S = 30.0
MARKER = "RS_EXEC"  # env var tagging every process an exec starts, to find escaped ones
# Kills every process whose environment carries the exec's marker (setsid'd or daemonised children too).
SWEEP = 'for p in /proc/[0-9]*; do grep -qsz "^$1=$2\\$" "$p/environ" && kill -9 "${p##*/}"; done; true'
OOM_COUNT = (
    "cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null"
    " | awk '$1==\"oom_kill\"{print $2}'"
)
WRITE = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"'
READ = 'test -f "$1" || { echo "no such regular file: $1" >&2; exit 2; }; head -c "$2" -- "$1"'

FAULT_KINDS: list[tuple[type[SandboxError], ErrorKind]] = [
    (SandboxNotFound, "not_found"),
    (SandboxCapacity, "capacity"),
    (SandboxStartupFailed, "startup_failed"),
    (SandboxOOM, "oom"),
    (SandboxTimeout, "timeout"),
    (SandboxBadRequest, "bad_request"),
]

log = structlog.get_logger()
encoder = msgspec.msgpack.Encoder()


class Sandbox(msgspec.Struct, kw_only=True):
    sandbox_id: str
    container_id: str
    expires: float
    oom_kills: int = 0


def fault_of(exc: SandboxError) -> SandboxFault:
    kind: ErrorKind = next((k for cls, k in FAULT_KINDS if isinstance(exc, cls)), "internal")
    return SandboxFault(error=kind, message=exc.message)


class Daemon:
    """Request handlers and the table of this instance's live sandboxes."""

    def __init__(self, settings: SandboxdSettings, nc: NATS, ops: DockerOps, owner: str) -> None:
        self.settings = settings
        self.nc = nc
        self.ops = ops
        self.owner = owner
        self.sandboxes: dict[str, Sandbox] = {}
        self.pending_creates = 0
        self.env_images: dict[str, str] = {}  # environment name -> image tag (spec read once)
        self.limiter = anyio.CapacityLimiter(settings.max_concurrent_requests)
        self.log = log.bind(sandboxd=owner)

    # -- registry (used by the reaper) --
    def expiry_of(self, container_id: str) -> float | None:
        sb = self.sandboxes.get(self._sid(container_id))
        return sb.expires if sb else None

    def forget(self, container_id: str) -> None:
        self.sandboxes.pop(self._sid(container_id), None)

    def _sid(self, container_id: str) -> str:
        return f"{self.owner}:{container_id[:12]}"

    def _get(self, sandbox_id: str) -> Sandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(
                "no such sandbox (closed, expired, or never created)", sandbox_id=sandbox_id
            )
        return sb

    # -- serving --
    async def serve(self, sub: Subscription, tg: TaskGroup) -> None:
        """Hand every message of ``sub`` to its own task; pings are answered inline."""
        async for msg in sub.messages:
            if msg.subject.endswith(".ping"):
                await msg.respond(encoder.encode(Done()))
                continue
            borrower = object()  # nats Msg is an unhashable dataclass
            await self.limiter.acquire_on_behalf_of(borrower)
            tg.start_soon(self._handle, msg, borrower)

    async def _handle(self, msg: Msg, borrower: object) -> None:
        try:
            reply = await self._reply_to(msg)
            if msg.reply:
                await msg.respond(encoder.encode(reply))
        except Exception:
            self.log.exception("request.reply_failed", subject=msg.subject)
        finally:
            self.limiter.release_on_behalf_of(borrower)

    async def _reply_to(self, msg: Msg) -> SandboxReply:
        try:
            req = request_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            self.log.warning("request.invalid", subject=msg.subject, error=str(exc))
            return SandboxFault(error="bad_request", message=f"invalid request: {exc}")
        try:
            return await self.dispatch(msg.subject, req)
        except SandboxError as exc:
            return fault_of(exc)
        except Exception as exc:
            self.log.exception("request.failed", subject=msg.subject, kind=type(req).__name__)
            return SandboxFault(error="internal", message=f"{type(exc).__name__}: {exc}")

    async def dispatch(self, subject: str, req: SandboxRequest) -> SandboxReply:
        if subject == CREATE_SUBJECT or isinstance(req, CreateRequest):
            if not (subject == CREATE_SUBJECT and isinstance(req, CreateRequest)):
                raise SandboxBadRequest(f"{type(req).__name__} does not belong on {subject}")
            return await self.create(req)
        sandbox_id = req.sandbox_id
        if not sandbox_id.startswith(f"{self.owner}:"):
            raise SandboxNotFound(f"sandbox is not owned by {self.owner}", sandbox_id=sandbox_id)
        match req:
            case ExecRequest():
                return await self.exec(req)
            case CloseRequest():
                return await self.close(req)
            case KeepaliveRequest():
                self._get(sandbox_id).expires = time.time() + self._ttl(req.ttl_s)
                return Done()
            case WriteFileRequest():
                return await self.write_file(req)
            case ReadFileRequest():
                return await self.read_file(req)
        raise SandboxBadRequest(f"unexpected request {type(req).__name__}")

    # -- operations --
    def _ttl(self, ttl_s: float) -> float:
        return ttl_s if ttl_s > 0 else self.settings.default_ttl_s

    def _with_defaults(self, req: CreateRequest) -> CreateRequest:
        """Non-positive limits in a request mean: this instance's defaults."""
        s = self.settings
        return msgspec.structs.replace(
            req,
            memory_mb=req.memory_mb if req.memory_mb > 0 else s.default_memory_mb,
            pids=req.pids if req.pids > 0 else s.default_pids,
            cpus=req.cpus if req.cpus > 0 else s.default_cpus,
            ttl_s=self._ttl(req.ttl_s),
        )

    async def _resolve_image(self, req: CreateRequest) -> str:
        image = req.image
        if not image:
            if req.environment not in self.env_images:
                try:
                    self.env_images[req.environment] = envhub.image_tag(req.environment)
                except EnvHubError as exc:
                    raise SandboxBadRequest(exc.message) from exc
            image = self.env_images[req.environment]
        if not await self.ops.image_exists(image):
            hint = f"run `rollstream env build {req.environment}`" if not req.image else "build or pull it"
            raise SandboxStartupFailed(f"image {image} is not present on this Docker host: {hint}.")
        return image

    async def create(self, req: CreateRequest) -> Created:
        started = time.monotonic()
        if len(self.sandboxes) + self.pending_creates >= self.settings.max_sandboxes:
            raise SandboxCapacity(f"{self.owner} already holds {self.settings.max_sandboxes} sandboxes")
        self.pending_creates += 1
        try:
            req = self._with_defaults(req)
            image = await self._resolve_image(req)
            expires = time.time() + req.ttl_s
            config = container_config(
                req, image=image, owner=self.owner, expires=expires, settings=self.settings
            )
            container_id = await self.ops.create(config)
            sandbox_id = self._sid(container_id)
            self.sandboxes[sandbox_id] = Sandbox(
                sandbox_id=sandbox_id, container_id=container_id, expires=expires
            )
        finally:
            self.pending_creates -= 1
        startup_ms = (time.monotonic() - started) * 1000
        self.log.debug("sandbox.created", sandbox_id=sandbox_id, image=image, startup_ms=round(startup_ms, 1))
        return Created(sandbox_id=sandbox_id, owner=self.owner, image=image, startup_ms=startup_ms)

    async def close(self, req: CloseRequest) -> Done:
        sb = self.sandboxes.pop(req.sandbox_id, None)
        if sb is not None:
            await self.ops.remove(sb.container_id)
            self.log.debug("sandbox.closed", sandbox_id=sb.sandbox_id)
        return Done()

    async def exec(self, req: ExecRequest) -> ExecResult:
        sb = self._get(req.sandbox_id)
        if req.timeout_s <= 0 or req.max_output_bytes < 2:
            raise SandboxBadRequest("timeout_s must be > 0 and max_output_bytes >= 2")
        token = secrets.token_hex(8)
        argv = ["timeout", "-s", "KILL", f"{req.timeout_s:.3f}", "bash", "-c", req.command]
        outcome = await self._exec_in(
            sb,
            argv,
            env=dict(req.env) | {MARKER: token},
            cwd=req.cwd,
            max_output_bytes=req.max_output_bytes,
            deadline_s=req.timeout_s + EXEC_GRACE_S,
        )
        timed_out = not outcome.finished or (
            outcome.exit_code in (124, 137) and outcome.duration_ms >= req.timeout_s * 1000 * 0.95
        )
        if timed_out:
            await self._exec_in(sb, ["sh", "-c", SWEEP, "sh", MARKER, token], deadline_s=FILE_OP_DEADLINE_S)
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

    async def _exec_in(self, sb: Sandbox, argv: list[str], **kwargs: Any) -> ExecOutcome:
        """Run in ``sb``'s container; if the container died meanwhile, say so (``oom`` or ``not_found``)."""
        try:
            outcome = await self.ops.exec(sb.container_id, argv, **kwargs)
        except SandboxNotFound:
            outcome = None
        if outcome is not None and outcome.exit_code not in (None, 137):
            return outcome
        state = await self.ops.state(sb.container_id)
        if state is not None and state.get("Running"):
            if outcome is None:
                raise SandboxNotFound("container refused the exec", sandbox_id=sb.sandbox_id)
            return outcome
        self.sandboxes.pop(sb.sandbox_id, None)
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

    async def write_file(self, req: WriteFileRequest) -> Done:
        sb = self._get(req.sandbox_id)
        path = _absolute(req.path, req.sandbox_id)
        argv = ["sh", "-c", WRITE, "sh", path, f"{req.mode & 0o7777:o}"]
        outcome = await self._exec_in(sb, argv, stdin=req.data, deadline_s=FILE_OP_DEADLINE_S)
        if outcome.exit_code != 0:
            raise SandboxBadRequest(
                f"cannot write {path}: {outcome.stderr.text().strip()}", sandbox_id=sb.sandbox_id
            )
        return Done()

    async def read_file(self, req: ReadFileRequest) -> FileData:
        sb = self._get(req.sandbox_id)
        path = _absolute(req.path, req.sandbox_id)
        argv = ["sh", "-c", READ, "sh", path, str(req.max_bytes + 1)]
        outcome = await self._exec_in(
            sb, argv, max_output_bytes=req.max_bytes + 1, keep_tail=False, deadline_s=FILE_OP_DEADLINE_S
        )
        if outcome.exit_code != 0:
            raise SandboxBadRequest(
                f"cannot read {path}: {outcome.stderr.text().strip()}", sandbox_id=sb.sandbox_id
            )
        data = outcome.stdout.raw()
        return FileData(path=path, data=data[: req.max_bytes], truncated=len(data) > req.max_bytes)

    async def remove_all(self) -> int:
        """Remove every container of this owner (registry or not); returns how many."""
        infos = await self.ops.list_sandboxes(owner=self.owner)
        self.sandboxes.clear()
        async with anyio.create_task_group() as tg:
            for info in infos:
                tg.start_soon(self.ops.remove, info["Id"])
        return len(infos)


def _absolute(path: str, sandbox_id: str) -> str:
    if not path.startswith("/"):
        raise SandboxBadRequest(f"path must be absolute, got {path!r}", sandbox_id=sandbox_id)
    return posixpath.normpath(path)


async def run(
    settings: SandboxdSettings,
    nc: NATS,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve sandboxes until cancelled, then remove all of this instance's containers."""
    owner = settings.instance or f"sbx-{secrets.token_hex(3)}"
    async with DockerOps() as ops:
        daemon = Daemon(settings, nc, ops, owner)
        subs: list[Subscription] = []
        try:
            await reaper.reap_once(
                ops,
                nc,
                daemon,
                owner=owner,
                scope=settings.scope,
                ping_timeout_s=settings.ping_timeout_s,
                startup=True,
            )
            subs.append(await nc.subscribe(f"rs.sandbox.{owner}.*"))
            subs.append(await nc.subscribe(CREATE_SUBJECT, queue=QUEUE))
            await nc.flush()
            async with anyio.create_task_group() as tg:
                for sub in subs:
                    tg.start_soon(daemon.serve, sub, tg)
                tg.start_soon(
                    lambda: reaper.run_reaper(
                        ops,
                        nc,
                        daemon,
                        owner=owner,
                        scope=settings.scope,
                        interval_s=settings.reaper_interval_s,
                        ping_timeout_s=settings.ping_timeout_s,
                    )
                )
                daemon.log.info("sandboxd.started", max_sandboxes=settings.max_sandboxes)
                task_status.started(owner)
        finally:
            with anyio.move_on_after(settings.shutdown_budget_s, shield=True):
                await _shutdown(daemon, subs)


async def _shutdown(daemon: Daemon, subs: list[Subscription]) -> None:
    for sub in subs:
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, OSError) as exc:  # connection already closed: nothing to unsubscribe
            daemon.log.debug("sandboxd.unsubscribe_failed", error=str(exc))
    removed = await daemon.remove_all()
    daemon.log.info("sandboxd.stopped", removed=removed)
