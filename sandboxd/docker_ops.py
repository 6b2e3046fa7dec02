"""Thin, typed layer over aiodocker: hardened sandbox containers, bounded exec capture, file I/O.

Two Docker clients: ``control`` for lifecycle calls (create, start, kill, delete, list) and
``streams`` (no connection limit) for exec streams, so long-running execs never starve a delete.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aiodocker
import aiohttp
import anyio
import msgspec
import structlog

from sandboxd import seccomp
from sandboxd.errors import SandboxError, SandboxNotFound, SandboxStartupFailed
from sandboxd.settings import SandboxdSettings
from sandboxd.users import AGENT_GID, AGENT_UID
from schemas.sandbox import CreateRequest

LABEL_SANDBOX = "rollstream.sandbox"
LABEL_OWNER = "rollstream.owner"
LABEL_EXPIRES = "rollstream.expires"
LABEL_SCOPE = "rollstream.scope"
WORKDIR = "/work"
MIB = 1024 * 1024
# What the root helpers need inside (the session driver empties the agent's bounding set, drops to
# its uid and kills its processes); root's other powers stay dropped; none survives into the agent.
CAPABILITIES = ["SETUID", "SETGID", "SETPCAP", "KILL"]

log = structlog.get_logger()


class Capture:
    """Bytes of one output stream, bounded: keeps the head and (optionally) the tail, counts the rest."""

    def __init__(self, cap: int, *, keep_tail: bool = True) -> None:
        self.head_cap = cap // 2 if keep_tail else cap
        self.tail_cap = cap - self.head_cap if keep_tail else 0
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_cap:
            self.tail += data[-self.tail_cap :]
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def raw(self) -> bytes:
        return bytes(self.head + self.tail)

    def text(self) -> str:
        """Head and tail as text; a marker line between them says how many bytes were dropped."""
        if not self.truncated:
            return self.raw().decode(errors="replace")
        dropped = self.total - len(self.head) - len(self.tail)
        marker = f"\n[... {dropped} bytes truncated ...]\n"
        return self.head.decode(errors="replace") + marker + self.tail.decode(errors="replace")


class ExecOutcome(msgspec.Struct, kw_only=True):
    exit_code: int | None  # None: the stream outlived the deadline, the exit code is unknown
    stdout: Capture
    stderr: Capture
    finished: bool  # the output stream ended before the deadline
    duration_ms: float


def container_name(scope: str, short_id: str) -> str:
    """The readable Docker name of a sandbox: ``rs-<scope>-<12 hex>`` (its id's suffix)."""
    return f"rs-{scope}-{short_id}"


def container_config(
    req: CreateRequest,
    *,
    image: str,
    owner: str,
    expires: float,
    settings: SandboxdSettings,
    arch: str = "amd64",
) -> dict[str, Any]:
    """The Docker create body of a sandbox: closed by default (no network, no capabilities beyond
    the helpers', an explicit seccomp profile, no log file, limits). The request's ``env`` is not
    the container's: it is given to the agent's commands only, never to root or verifier processes."""
    labels = dict(req.labels)  # the caller's labels; ours below win over any of the same name
    labels |= {
        LABEL_SANDBOX: "1",
        LABEL_OWNER: owner,
        LABEL_EXPIRES: f"{expires:.0f}",
        LABEL_SCOPE: settings.scope,
    }
    scratch = f"rw,exec,nosuid,nodev,size={settings.scratch_mb}m"
    work = f"rw,exec,nosuid,nodev,size={req.work_mb or settings.scratch_mb}m"  # task sandboxes: larger
    return {
        "Image": image,
        "Cmd": ["sleep", "infinity"],
        "WorkingDir": WORKDIR,
        "Env": [f"HOME={WORKDIR}", "LANG=C.UTF-8"],
        "Labels": labels,
        "HostConfig": {
            "NetworkMode": "none",
            "IpcMode": "private",
            "CapDrop": ["ALL"],
            "CapAdd": CAPABILITIES,
            "SecurityOpt": ["no-new-privileges", "seccomp=" + seccomp.profile(arch)],
            "Runtime": settings.runtime,
            "LogConfig": {"Type": "none", "Config": {}},  # nothing written inside grows a host file
            "PidsLimit": req.pids,
            "Memory": req.memory_mb * MIB,
            "MemorySwap": req.memory_mb * MIB,
            "NanoCpus": int(req.cpus * 1e9),
            "Init": True,
            "ReadonlyRootfs": settings.read_only_rootfs and not req.writable_root,
            "Tmpfs": {
                WORKDIR: f"{work},mode=0755,uid={AGENT_UID},gid={AGENT_GID}",
                "/tmp": f"{scratch},mode=1777",
            },
            # No nproc: RLIMIT_NPROC counts a uid's processes on the whole host, and every sandbox's
            # agent has the same uid; PidsLimit bounds each container's processes instead.
            "Ulimits": [
                {"Name": "nofile", "Soft": settings.nofile, "Hard": settings.nofile},
                {"Name": "core", "Soft": 0, "Hard": 0},
            ],
        },
    }


def _gone(exc: aiodocker.DockerError) -> bool:
    """Docker's way of saying the container no longer exists or no longer runs."""
    return exc.status == 404 or (exc.status == 409 and "not running" in str(exc.message))


class DockerOps:
    """Container lifecycle and exec for one sandboxd instance."""

    def __init__(self) -> None:
        self.control: aiodocker.Docker | None = None
        self.streams: aiodocker.Docker | None = None
        self.arch = "amd64"  # the engine's architecture (its seccomp profile names it)

    async def __aenter__(self) -> DockerOps:
        self.control = aiodocker.Docker()
        self._connector: aiohttp.BaseConnector | None = None
        where = self.control.docker_host
        if isinstance(self.control.connector, aiohttp.UnixConnector):
            where = f"unix://{self.control.connector.path}"
            self._connector = aiohttp.UnixConnector(path=self.control.connector.path, limit=0)
            self.streams = aiodocker.Docker(url="unix://localhost", connector=self._connector)
        else:
            self.streams = aiodocker.Docker(url=self.control.docker_host)
        try:
            self.arch = str((await self.control.version()).get("Arch", "amd64"))
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            await self.aclose()
            raise SandboxError(
                f"no Docker engine answers at {where} ({exc}): start dockerd "
                "(`dockerd --iptables=false --bridge=none >/tmp/dockerd.log 2>&1 &`)."
            ) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    async def aclose(self) -> None:
        for client in (self.streams, self.control):
            if client is not None:
                await client.close()
        if self._connector is not None:
            await self._connector.close()

    @property
    def _ctl(self) -> aiodocker.Docker:
        assert self.control is not None
        return self.control

    @property
    def _str(self) -> aiodocker.Docker:
        assert self.streams is not None
        return self.streams

    @property
    def streams_client(self) -> aiodocker.Docker:
        """The client for long-lived exec streams (sessions); never used for control calls."""
        return self._str

    async def image_exists(self, image: str) -> bool:
        try:
            await self._ctl.images.inspect(image)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def image_env(self, image: str) -> dict[str, str]:
        """The image's ``ENV`` (a task image's own variables, which sessions must keep too)."""
        info = await self._ctl.images.inspect(image)
        pairs = (item.partition("=") for item in (info.get("Config") or {}).get("Env") or [])
        return {key: value for key, _, value in pairs if key}

    async def create(self, config: dict[str, Any], name: str | None = None) -> str:
        """Create (named ``name``), then start; a container that fails to start is removed.
        Returns the full id."""
        try:
            container = await self._ctl.containers.create(config, name=name)
        except aiodocker.DockerError as exc:
            raise SandboxStartupFailed(f"docker create failed: {exc.message}") from exc
        try:
            await container.start()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.remove(container.id)
            if isinstance(exc, aiodocker.DockerError):
                raise SandboxStartupFailed(f"docker start failed: {exc.message}") from exc
            raise
        return str(container.id)

    async def remove(self, container_id: str) -> bool:
        """Kill and remove a container; True if it existed."""
        try:
            await self._ctl.containers.container(container_id).delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            if exc.status == 409 and "already in progress" in str(exc.message):
                return True
            raise
        return True

    async def list_sandboxes(
        self, *, scope: str | None = None, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """Rollstream sandbox containers (of one scope / owner if given), running or not."""
        labels = [f"{LABEL_SANDBOX}=1"]
        labels += [f"{LABEL_SCOPE}={scope}"] if scope else []
        labels += [f"{LABEL_OWNER}={owner}"] if owner else []
        found = await self._ctl.containers.list(
            all=True, filters=msgspec.json.encode({"label": labels}).decode()
        )
        return [c._container for c in found]

    async def state(self, container_id: str) -> dict[str, Any] | None:
        try:
            info = await self._ctl.containers.container(container_id).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(info["State"])

    async def exec(
        self,
        container_id: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        user: str = "0:0",
        max_output_bytes: int = 16384,
        keep_tail: bool = True,
        deadline_s: float = 60.0,
    ) -> ExecOutcome:
        """Run ``argv`` in the container as ``user`` (``uid:gid``); capture bounded output until it
        ends or ``deadline_s`` passes."""
        container = self._str.containers.container(container_id)
        started = time.monotonic()
        try:
            exe = await container.exec(
                argv, stdin=stdin is not None, environment=dict(env or {}), workdir=cwd or "", user=user
            )
        except aiodocker.DockerError as exc:
            if _gone(exc):
                raise SandboxNotFound(f"container is gone or not running ({exc.message})") from exc
            raise
        out = Capture(max_output_bytes, keep_tail=keep_tail)
        err = Capture(max_output_bytes, keep_tail=keep_tail)
        finished = False
        with anyio.move_on_after(deadline_s):
            async with exe.start(detach=False) as stream:
                if stdin is not None:
                    await stream.write_in(stdin)
                    _half_close(stream)
                while (msg := await stream.read_out()) is not None:
                    (out if msg.stream == 1 else err).feed(msg.data)
                finished = True
        exit_code = await self._exit_code(exe) if finished else None
        return ExecOutcome(
            exit_code=exit_code,
            stdout=out,
            stderr=err,
            finished=finished,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    @staticmethod
    async def _exit_code(exe: Any) -> int | None:
        """Exit code from exec inspect; the stream can end a moment before Docker records it."""
        for _ in range(50):
            info = await exe.inspect()
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            await anyio.sleep(0.02)
        return None


def _half_close(stream: Any) -> None:
    """Send EOF on the exec's stdin while keeping its output open (aiodocker has no public call)."""
    transport = stream._resp.connection.transport
    if transport is not None and transport.can_write_eof():
        transport.write_eof()
