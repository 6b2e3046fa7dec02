"""Task sandboxes: the size limit of a writable root.

Imported tasks (Harbor, Terminal-Bench, SWE-style) need to write where their image put files, so
their sandboxes may have a writable copy-on-write root (``CreateRequest.writable_root``). Docker
can bound that layer only on overlay over xfs with ``pquota`` (``--storage-opt size``), which
common hosts lack, so ``RootfsWatch`` measures each writable sandbox's layer (``SizeRw``) every
``rootfs_check_s`` and removes a sandbox whose layer outgrew ``rootfs_mb``: its next request gets
``not_found``, which the agent loop reports as an aborted episode. ``/work`` and ``/tmp`` stay
size-limited tmpfs mounts (``/work`` sized by ``work_mb``, at most ``max_work_mb``: more is refused,
as are cpus and memory above ``max_cpus`` and ``max_memory_mb``, by ``sandboxd.limits``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker
import anyio
import structlog

from sandboxd.docker_ops import MIB, DockerOps


class RootfsWatch:
    """Removes writable-root sandboxes whose container layer grew past ``limit_mb``."""

    def __init__(
        self,
        ops: DockerOps,
        *,
        limit_mb: int,
        interval_s: float,
        live: Callable[[str], bool],
        evict: Callable[[str], Awaitable[None]],
        log: Any = None,
    ) -> None:
        self.ops = ops
        self.log = log if log is not None else structlog.get_logger(__name__)  # the daemon's, bound
        self.limit_bytes = limit_mb * MIB
        self.interval_s = interval_s
        self.live = live  # is this sandbox id still held?
        self.evict = evict  # remove it (and its container)
        self.watched: dict[str, str] = {}  # sandbox id -> container id
        self.evicted = 0

    def watch(self, sandbox_id: str, container_id: str) -> None:
        self.watched[sandbox_id] = container_id

    async def layer_bytes(self, container_id: str) -> int | None:
        """Bytes written to the container's own layer (None if it is gone)."""
        docker = self.ops.control  # a control call: never on the exec-stream client
        assert docker is not None
        try:
            info = await docker.containers.container(container_id).show(size=1)
        except aiodocker.DockerError:
            return None
        return int(info.get("SizeRw") or 0)

    async def check_once(self) -> list[str]:
        """One pass over the watched sandboxes; returns the ids it removed."""
        removed = []
        for sandbox_id, container_id in list(self.watched.items()):
            if not self.live(sandbox_id):
                del self.watched[sandbox_id]
                continue
            size = await self.layer_bytes(container_id)
            if size is not None and size > self.limit_bytes:
                self.log.warning(
                    "sandbox.rootfs_exceeded", sandbox_id=sandbox_id, bytes=size, limit=self.limit_bytes
                )
                del self.watched[sandbox_id]
                await self.evict(sandbox_id)
                self.evicted += 1
                removed.append(sandbox_id)
        return removed

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            await self.check_once()
