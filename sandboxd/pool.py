"""Warm pool: started containers (with their exec session already open) kept ready per image, so
that ``create`` of a default sandbox is a dictionary pop. A background task refills it.

Pool containers carry the owner label like any sandbox: the reaper treats them as live while this
instance answers, and removes them with everything else of a dead owner.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import structlog

from sandboxd.session import Session

REFILL_BACKOFF_S = 5.0  # after a failed refill (image missing, engine error), before trying again

log = structlog.get_logger()


class Pooled(msgspec.Struct, kw_only=True):
    container_id: str
    short_id: str  # its name's suffix, the sandbox id's once it is taken
    session: Session | None  # the exec session, opened while the container waited in the pool
    since: float


Make = Callable[[str], Awaitable[Pooled]]  # image -> a new started container
Images = Callable[[], Awaitable[list[str]]]  # the images to keep warm (built ones only)


class WarmPool:
    """Up to ``size`` ready containers per image; ``take`` never waits for Docker."""

    def __init__(self, size: int, make: Make, images: Images) -> None:
        self.size = size
        self.make = make
        self.images = images
        self.ready: dict[str, list[Pooled]] = {}
        self.container_ids: set[str] = set()
        self._wake = anyio.Event()

    def take(self, image: str) -> Pooled | None:
        """A ready container of ``image`` (no longer the pool's), or None; wakes the refill."""
        entries = self.ready.get(image)
        self._wake.set()
        if not entries:
            return None
        entry = entries.pop(0)
        self.container_ids.discard(entry.container_id)
        return entry

    def holds(self, container_id: str) -> bool:
        return container_id in self.container_ids

    def forget(self, container_id: str) -> None:
        """Drop a container the reaper removed (it was unknown or its owner is dead)."""
        self.container_ids.discard(container_id)
        for entries in self.ready.values():
            entries[:] = [e for e in entries if e.container_id != container_id]

    def drain(self) -> list[Pooled]:
        """Everything still pooled (for shutdown)."""
        entries = [e for es in self.ready.values() for e in es]
        self.ready.clear()
        self.container_ids.clear()
        return entries

    async def run(self) -> None:
        """Refill every pool to ``size`` whenever one was taken from; runs until cancelled."""
        if self.size <= 0:
            return
        while True:
            self._wake = anyio.Event()  # before filling: a take meanwhile wakes the next round
            failed = False
            for image in await self.images():
                entries = self.ready.setdefault(image, [])
                while len(entries) < self.size:
                    started = time.monotonic()
                    try:
                        entry = await self.make(image)
                    except Exception as exc:  # noqa: BLE001  (the refill task must outlive any failure)
                        log.warning("pool.refill_failed", image=image, error=str(exc))
                        failed = True
                        break
                    entries.append(entry)
                    self.container_ids.add(entry.container_id)
                    log.debug("pool.filled", image=image, ms=round((time.monotonic() - started) * 1000))
            with anyio.move_on_after(REFILL_BACKOFF_S if failed else 60.0):
                await self._wake.wait()
