"""The sandboxd daemon: serves ``rs.sandbox.create`` (queue group ``sandboxd``) and this
instance's ``rs.sandbox.<owner>.<op>`` subjects, one task per request.
"""

from __future__ import annotations

import posixpath
import secrets
import time

import anyio
import msgspec
import nats.errors
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sandboxd import envhub, reaper
from sandboxd.commands import FILE_OP_DEADLINE_S, Commands, Sandbox
from sandboxd.docker_ops import DockerOps, container_config
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
from sandboxd.pool import Pooled, WarmPool
from sandboxd.rootfs import RootfsWatch, clamp_resources
from sandboxd.session import Session
from sandboxd.settings import SandboxdSettings
from schemas.sandbox import (
    CloseRequest,
    Created,
    CreateRequest,
    Done,
    ErrorKind,
    ExecRequest,
    FileData,
    KeepaliveRequest,
    ReadFileRequest,
    SandboxFault,
    SandboxReply,
    SandboxRequest,
    SessionCloseRequest,
    SessionInterruptRequest,
    SessionOpenRequest,
    SessionRunRequest,
    WriteFileRequest,
    request_decoder,
)

CREATE_SUBJECT = "rs.sandbox.create"
QUEUE = "sandboxd"
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


def fault_of(exc: SandboxError) -> SandboxFault:
    kind: ErrorKind = next((k for cls, k in FAULT_KINDS if isinstance(exc, cls)), "internal")
    return SandboxFault(error=kind, message=exc.message)


class Daemon(Commands):
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
        self.pool = WarmPool(settings.warm_pool, self._make_pooled, self._warm_images)
        self.rootfs = RootfsWatch(
            ops,
            limit_mb=settings.rootfs_mb,
            interval_s=settings.rootfs_check_s,
            live=lambda sid: sid in self.sandboxes,
            evict=lambda sid: self.close(CloseRequest(sandbox_id=sid)),
        )

    # -- registry (used by the reaper) --
    def expiry_of(self, container_id: str) -> float | None:
        if self.pool.holds(container_id):
            return float("inf")
        sb = self.sandboxes.get(self._sid(container_id))
        return sb.expires if sb else None

    def forget(self, container_id: str) -> None:
        self.pool.forget(container_id)
        sb = self.sandboxes.pop(self._sid(container_id), None)
        for session in sb.all_sessions() if sb is not None else []:
            session.abandon()  # the reaper removes the container: its streams end with it

    def _sid(self, container_id: str) -> str:
        return f"{self.owner}:{container_id[:12]}"

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
            case SessionOpenRequest():
                return await self.session_open(req)
            case SessionRunRequest():
                return await self.session_run(req)
            case SessionInterruptRequest():
                await self._session(req.sandbox_id, req.session_id).signal(kill=req.kill)
                return Done()
            case SessionCloseRequest():
                session = self._get(req.sandbox_id).sessions.pop(req.session_id, None)
                if session is not None:
                    await session.close()
                return Done()
        raise SandboxBadRequest(f"unexpected request {type(req).__name__}")

    # -- operations --
    def _ttl(self, ttl_s: float) -> float:
        return ttl_s if ttl_s > 0 else self.settings.default_ttl_s

    def _with_defaults(self, req: CreateRequest) -> CreateRequest:
        """Non-positive limits in a request mean: this instance's defaults."""
        s = self.settings
        req = msgspec.structs.replace(
            req,
            memory_mb=req.memory_mb if req.memory_mb > 0 else s.default_memory_mb,
            pids=req.pids if req.pids > 0 else s.default_pids,
            cpus=req.cpus if req.cpus > 0 else s.default_cpus,
            ttl_s=self._ttl(req.ttl_s),
        )
        return clamp_resources(req, s)

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
            pooled = self.pool.take(image) if self._poolable(req) else None
            if pooled is not None:
                container_id, session = pooled.container_id, pooled.session
            else:
                config = container_config(
                    req, image=image, owner=self.owner, expires=expires, settings=self.settings
                )
                container_id, session = await self.ops.create(config), None
            sandbox_id = self._sid(container_id)
            self.sandboxes[sandbox_id] = Sandbox(
                sandbox_id=sandbox_id,
                container_id=container_id,
                expires=expires,
                labels=dict(req.labels),
                exec_session=session,
            )
            if req.writable_root:
                self.rootfs.watch(sandbox_id, container_id)
        finally:
            self.pending_creates -= 1
        startup_ms = (time.monotonic() - started) * 1000
        self.log.debug(
            "sandbox.created",
            sandbox_id=sandbox_id,
            image=image,
            warm=pooled is not None,
            ms=round(startup_ms, 1),
        )
        return Created(sandbox_id=sandbox_id, owner=self.owner, image=image, startup_ms=startup_ms)

    def _poolable(self, req: CreateRequest) -> bool:
        """A pool container fits a request for the default limits and no env (both fixed at creation)."""
        s = self.settings
        defaults = (s.default_memory_mb, s.default_pids, s.default_cpus)
        fixed = req.writable_root or req.work_mb > 0  # task sandboxes are made to measure
        return not req.env and not fixed and (req.memory_mb, req.pids, req.cpus) == defaults

    async def _warm_images(self) -> list[str]:
        images = []
        for name in self.settings.warm_environments:
            try:
                images.append(await self._resolve_image(CreateRequest(environment=name)))
            except SandboxError as exc:
                self.log.debug("pool.image_unavailable", environment=name, error=exc.message)
        return images

    async def _make_pooled(self, image: str) -> Pooled:
        req = self._with_defaults(CreateRequest(memory_mb=0, pids=0, cpus=0.0, ttl_s=0.0))
        config = container_config(
            req, image=image, owner=self.owner, expires=time.time() + 365 * 86400, settings=self.settings
        )
        container_id = await self.ops.create(config)
        session = None
        if self.settings.exec_via_session:
            try:
                session = await Session.open(self.ops.streams_client, container_id)
                await session.run(
                    "true", prelude="", keep=False, timeout_s=10, max_output_bytes=64
                )  # warm it
            except SandboxError as exc:  # the first exec will try again, or use docker exec
                self.log.debug("pool.session_failed", error=exc.message)
        return Pooled(container_id=container_id, session=session, since=time.time())

    async def close(self, req: CloseRequest) -> Done:
        sb = self.sandboxes.pop(req.sandbox_id, None)
        if sb is not None:
            for session in sb.all_sessions():
                await session.close()
            await self.ops.remove(sb.container_id)
            self.log.debug("sandbox.closed", sandbox_id=sb.sandbox_id)
        return Done()

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
        """Remove every container of this owner (registry or not, pooled too); returns how many."""
        sessions = [x for sb in self.sandboxes.values() for x in sb.all_sessions()]
        sessions += [p.session for p in self.pool.drain() if p.session is not None]
        for session in sessions:
            await session.close()
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
                tg.start_soon(daemon.pool.run)
                tg.start_soon(daemon.rootfs.run)
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
