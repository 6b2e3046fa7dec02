"""The sandboxd daemon: serves ``rs.sandbox.create`` (queue group ``sandboxd``) and this instance's
``rs.sandbox.<owner>.<op>`` subjects, one task per request; pings on their own subscription.

Authorisation: the op of the subject must be the request's (``schemas.sandbox.OPS``); every
request about a sandbox carries the token its create returned, except ``verify`` and ``inspect``
(granted by the broker to the reward roles only); after ``verify`` began, no agent operation is accepted.
"""

from __future__ import annotations

import hmac
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

from sandboxd import envhub, limits, model_socket, reaper
from sandboxd.commands import AGENT_USER_SPEC, FILE_OP_DEADLINE_S, Sandbox
from sandboxd.docker_ops import DockerOps, container_config, container_name
from sandboxd.errors import (
    EnvHubError,
    SandboxBadRequest,
    SandboxCapacity,
    SandboxError,
    SandboxForbidden,
    SandboxNotFound,
    SandboxOOM,
    SandboxStartupFailed,
    SandboxTimeout,
)
from sandboxd.pool import Pooled, WarmPool
from sandboxd.rootfs import RootfsWatch
from sandboxd.session import Session
from sandboxd.settings import SandboxdSettings
from sandboxd.verify import Verification
from schemas.sandbox import (
    OPS,
    CloseRequest,
    Created,
    CreateRequest,
    Done,
    ErrorKind,
    ExecRequest,
    FileData,
    InspectRequest,
    KeepaliveRequest,
    ReadFileRequest,
    SandboxFault,
    SandboxReply,
    SandboxRequest,
    SessionCloseRequest,
    SessionInterruptRequest,
    SessionOpenRequest,
    SessionRunRequest,
    VerifyRequest,
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
    (SandboxForbidden, "forbidden"),
]
AgentRequest = (
    ExecRequest
    | WriteFileRequest
    | ReadFileRequest
    | SessionOpenRequest
    | SessionRunRequest
    | SessionInterruptRequest
    | SessionCloseRequest
)

log = structlog.get_logger()
encoder = msgspec.msgpack.Encoder()


def fault_of(exc: SandboxError) -> SandboxFault:
    kind: ErrorKind = next((k for cls, k in FAULT_KINDS if isinstance(exc, cls)), "internal")
    return SandboxFault(error=kind, message=exc.message)


class Daemon(Verification):
    """Request handlers and the table of this instance's live sandboxes."""

    def __init__(self, settings: SandboxdSettings, nc: NATS, ops: DockerOps, owner: str) -> None:
        self.settings = settings
        self.nc = nc
        self.ops = ops
        self.owner = owner
        self.sandboxes: dict[str, Sandbox] = {}
        self.by_container: dict[str, str] = {}  # container id -> sandbox id
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
            evict=self._evict,
            log=self.log,
        )

    # -- registry (used by the reaper) --
    def expiry_of(self, container_id: str) -> float | None:
        if self.pool.holds(container_id):
            return float("inf")
        sb = self.sandboxes.get(self.by_container.get(container_id, ""))
        return sb.expires if sb else None

    def forget(self, container_id: str) -> None:
        self.pool.forget(container_id)
        sb = self.sandboxes.pop(self.by_container.pop(container_id, ""), None)
        for session in sb.all_sessions() if sb is not None else []:
            session.abandon()  # the reaper removes the container: its streams end with it

    # -- serving --
    async def serve(self, sub: Subscription, tg: TaskGroup) -> None:
        """Hand every message of ``sub`` to its own task, at most ``max_concurrent_requests`` at once
        (the rest wait). Pings are not served here: ``serve_pings`` answers them however busy this is."""
        async for msg in sub.messages:
            if msg.subject.endswith(".ping"):
                continue
            borrower = object()  # nats Msg is an unhashable dataclass
            await self.limiter.acquire_on_behalf_of(borrower)
            tg.start_soon(self._handle, msg, borrower)

    async def serve_pings(self, sub: Subscription) -> None:
        """Answer ``rs.sandbox.<owner>.ping`` at once: other instances' reapers judge liveness by it."""
        async for msg in sub.messages:
            try:
                await msg.respond(encoder.encode(Done()))
            except nats.errors.Error as exc:
                self.log.debug("ping.reply_failed", error=str(exc))

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
        """Refuse a request on a subject not of its kind, or without its sandbox's token; then serve it."""
        if subject == CREATE_SUBJECT or isinstance(req, CreateRequest):
            if not (subject == CREATE_SUBJECT and isinstance(req, CreateRequest)):
                raise SandboxBadRequest(f"a {type(req).__name__} does not belong on {subject}")
            return await self.create(req)
        op = subject.rsplit(".", 1)[-1]
        if OPS.get(type(req)) != op:
            raise SandboxBadRequest(
                f"a {type(req).__name__} does not belong on the `{op}` operation ({subject})"
            )
        if not req.sandbox_id.startswith(f"{self.owner}:"):
            raise SandboxNotFound(f"sandbox is not owned by {self.owner}", sandbox_id=req.sandbox_id)
        if isinstance(req, VerifyRequest):  # authorised by the broker: only reward roles may send it
            return await self.verify(req)
        if isinstance(req, InspectRequest):  # likewise
            return await self.inspect(req)
        if isinstance(req, CloseRequest):
            return await self.close(req)
        sb = self._get(req.sandbox_id)
        self._check_token(sb, req.token)
        if isinstance(req, KeepaliveRequest):
            return self.keepalive(sb, req)
        if sb.sealed:
            raise SandboxForbidden(
                "the sandbox is sealed: verification began, the agent's operations are over",
                sandbox_id=sb.sandbox_id,
            )
        sb.agent_ops += 1
        try:
            return await self._agent_op(req)
        finally:
            sb.agent_ops -= 1

    async def close(self, req: CloseRequest) -> Done:
        """Remove the sandbox; closing one that is gone is fine (the token is checked if it is not)."""
        sb = self.sandboxes.get(req.sandbox_id)
        if sb is not None:
            self._check_token(sb, req.token)
            await self.close_sandbox(sb)
        return Done()

    def keepalive(self, sb: Sandbox, req: KeepaliveRequest) -> Done:
        if req.ttl_s > self.settings.max_ttl_s:
            raise SandboxBadRequest(
                f"`ttl_s` = {req.ttl_s:g} is above this sandboxd's bound of {self.settings.max_ttl_s:g} "
                "(sandboxd.max_ttl_s)"
            )
        sb.expires = time.time() + self._ttl(req.ttl_s)
        return Done()

    def _check_token(self, sb: Sandbox, token: str) -> None:
        if not hmac.compare_digest(sb.token.encode(), token.encode()):
            raise SandboxForbidden(
                "this request needs the sandbox's capability token (the `token` its create returned)",
                sandbox_id=sb.sandbox_id,
            )

    async def _agent_op(self, req: AgentRequest) -> SandboxReply:
        match req:
            case ExecRequest():
                return await self.exec(req)
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

    def _new_container(self, req: CreateRequest, image: str, expires: float) -> tuple[str, dict[str, Any]]:
        """A fresh short id and the create body of its container (with its model socket, if asked)."""
        config = container_config(
            req, image=image, owner=self.owner, expires=expires, settings=self.settings, arch=self.ops.arch
        )
        short = secrets.token_hex(6)
        if req.model_socket:
            config["HostConfig"]["Binds"] = model_socket.make(self.settings, short)
        return short, config

    async def create(self, req: CreateRequest) -> Created:
        started = time.monotonic()
        limits.check_create(req, self.settings)
        if len(self.sandboxes) + self.pending_creates >= self.settings.max_sandboxes:
            raise SandboxCapacity(f"{self.owner} already holds {self.settings.max_sandboxes} sandboxes")
        self.pending_creates += 1
        try:
            req = self._with_defaults(req)
            image = await self._resolve_image(req)
            expires = time.time() + req.ttl_s
            pooled = self.pool.take(image) if self._poolable(req) else None
            if pooled is not None:
                container_id, short, session = pooled.container_id, pooled.short_id, pooled.session
            else:
                short, config = self._new_container(req, image, expires)
                name = container_name(self.settings.scope, short)
                container_id, session = await self.ops.create(config, name), None
            sandbox_id, token = f"{self.owner}:{short}", secrets.token_urlsafe(32)
            self.by_container[container_id] = sandbox_id
            self.sandboxes[sandbox_id] = Sandbox(
                sandbox_id=sandbox_id,
                container_id=container_id,
                expires=expires,
                token=token,
                env=await self.ops.image_env(image) | dict(req.env),
                labels=dict(req.labels),
                exec_session=session,
            )
            if req.writable_root:
                self.rootfs.watch(sandbox_id, container_id)
        finally:
            self.pending_creates -= 1
        startup_ms = (time.monotonic() - started) * 1000
        warm, ms = pooled is not None, round(startup_ms, 1)
        self.log.debug("sandbox.created", sandbox_id=sandbox_id, image=image, warm=warm, ms=ms)
        return Created(
            sandbox_id=sandbox_id,
            owner=self.owner,
            image=image,
            startup_ms=startup_ms,
            token=token,
            container=container_name(self.settings.scope, short),
            model_socket_dir=model_socket.socket_dir(self.settings, short) if req.model_socket else "",
        )

    def _poolable(self, req: CreateRequest) -> bool:
        """A pool container fits a request for the default limits (fixed at creation)."""
        s = self.settings
        defaults = (s.default_memory_mb, s.default_pids, s.default_cpus)
        fixed = req.writable_root or req.work_mb > 0 or req.model_socket  # made to measure
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
        short, config = self._new_container(req, image, time.time() + 365 * 86400)
        container_id = await self.ops.create(config, container_name(self.settings.scope, short))
        session = None
        if self.settings.exec_via_session:
            try:
                session = await Session.open(self.ops.streams_client, container_id)
                await session.run(
                    "true", prelude="", keep=False, timeout_s=10, max_output_bytes=64
                )  # warm it
            except SandboxError as exc:  # the first exec will try again, or use docker exec
                self.log.debug("pool.session_failed", error=exc.message)
        return Pooled(container_id=container_id, short_id=short, session=session, since=time.time())

    async def _evict(self, sandbox_id: str) -> None:
        """Remove a sandbox sandboxd itself gave up on (a writable root past its limit)."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None:
            await self.close_sandbox(sb)

    async def close_sandbox(self, sb: Sandbox) -> None:
        """Remove ``sb``'s container and forget it (closing twice is fine)."""
        self.sandboxes.pop(sb.sandbox_id, None)
        self.by_container.pop(sb.container_id, None)
        for session in sb.all_sessions():
            await session.close()
        await self.ops.remove(sb.container_id)
        await model_socket.release(self.settings, sb.sandbox_id)
        self.log.debug("sandbox.closed", sandbox_id=sb.sandbox_id)

    async def write_file(self, req: WriteFileRequest) -> Done:
        """Write as the agent uid: a file operation can reach what the agent's commands can, no more."""
        sb = self._get(req.sandbox_id)
        limits.check_file_size(len(req.data), "data", self.settings)
        path = limits.absolute_path(req.path)
        argv = ["sh", "-c", WRITE, "sh", path, f"{req.mode & 0o777:o}"]
        outcome = await self._exec_in(
            sb, argv, stdin=req.data, user=AGENT_USER_SPEC, env=sb.env, deadline_s=FILE_OP_DEADLINE_S
        )
        if outcome.exit_code != 0:
            raise SandboxBadRequest(
                f"cannot write {path}: {outcome.stderr.text().strip()}", sandbox_id=sb.sandbox_id
            )
        return Done()

    async def read_file(self, req: ReadFileRequest) -> FileData:
        """Read as the agent uid (see ``write_file``)."""
        sb = self._get(req.sandbox_id)
        limits.check_file_size(req.max_bytes, "max_bytes", self.settings)
        path = limits.absolute_path(req.path)
        argv = ["sh", "-c", READ, "sh", path, str(req.max_bytes + 1)]
        outcome = await self._exec_in(
            sb,
            argv,
            user=AGENT_USER_SPEC,
            max_output_bytes=req.max_bytes + 1,
            keep_tail=False,
            deadline_s=FILE_OP_DEADLINE_S,
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
        self.by_container.clear()
        async with anyio.create_task_group() as tg:
            for info in infos:
                tg.start_soon(self.ops.remove, info["Id"])
        return len(infos)


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
            subs.append(await nc.subscribe(f"rs.sandbox.{owner}.ping"))
            subs.append(await nc.subscribe(f"rs.sandbox.{owner}.*"))
            subs.append(await nc.subscribe(CREATE_SUBJECT, queue=QUEUE))
            await nc.flush()
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.serve_pings, subs[0])
                for sub in subs[1:]:
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
                tg.start_soon(reaper.expire_leases, daemon)
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
