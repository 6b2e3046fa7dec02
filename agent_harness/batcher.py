"""A batching front for an inference engine: concurrent episodes share one forward batch.

Each episode asks for one generation at a time; a rollout worker runs many episodes at once. The
``Batcher`` queues the requests of concurrent callers and hands them to the inner engine as one
``generate`` call (one padded, KV-cached batch in ``TorchEngine``): a batch starts as soon as the
engine is free and either ``max_batch`` requests wait or the first of them has waited
``max_wait_s``. While a batch runs, new requests queue for the next one.

Weight swaps stay between batches: ``load_weights`` goes to the inner engine, whose lock
serialises it with ``generate``; every ``Generation`` carries the version its batch ran with, and
callers must stamp chunks with that version (not with ``engine.version`` read before the call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from agent_harness.engine import Generation, GenRequest, InferenceEngine

log = structlog.get_logger(__name__)


@dataclass
class _Pending:
    requests: list[GenRequest]
    wake: anyio.Event = field(default_factory=anyio.Event)
    result: list[Generation] | None = None
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass
class BatchStats:
    """Counters of the batches served so far (for benchmarks and logs)."""

    batches: int = 0
    requests: int = 0
    largest: int = 0
    gen_s: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class Batcher:
    """An ``InferenceEngine`` that merges the concurrent ``generate`` calls of many callers."""

    def __init__(self, inner: InferenceEngine, *, max_batch: int = 8, max_wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner = inner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._arrived = anyio.Event()
        self._driving = False

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        await self.inner.load_weights(safetensors_bytes, version)

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """Queue ``requests`` (served together, possibly with other callers'), wait for them.

        No background task: whichever waiting caller finds the engine idle drives it until its own
        requests are served, then hands over; so cancellation stays with the callers.
        """
        if not requests:
            return []
        mine = _Pending(list(requests))
        self._queue.append(mine)
        self._arrived.set()
        while not mine.done:
            if self._driving:
                mine.wake = anyio.Event()
                await mine.wake.wait()
                continue
            self._driving = True
            try:
                while not mine.done:
                    await self._gather()
                    await self._serve(self._take())
            finally:
                self._driving = False
                for p in self._queue:  # the next in line takes over
                    p.wake.set()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    async def _gather(self) -> None:
        """Wait up to ``max_wait_s`` for the batch to fill (not at all once it is full)."""
        deadline = time.monotonic() + self.max_wait_s
        while self._size() < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived = anyio.Event()
            with anyio.move_on_after(left):
                await self._arrived.wait()

    def _size(self) -> int:
        return sum(len(p.requests) for p in self._queue)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].requests) <= self.max_batch):
            p = self._queue.pop(0)
            batch.append(p)
            size += len(p.requests)
        return batch

    async def _serve(self, batch: list[_Pending]) -> None:
        """One engine call for the whole batch. Shielded: other callers' requests ride on it, so a
        cancelled driver (an episode timeout) lets the batch finish before the cancellation lands."""
        flat = [r for p in batch for r in p.requests]
        t0 = time.perf_counter()
        try:
            with anyio.CancelScope(shield=True):
                gens = await self.inner.generate(flat)
        except Exception as exc:  # noqa: BLE001 -- every caller of the batch gets the error
            for p in batch:
                p.error = exc
                p.wake.set()
            return
        self.stats.batches += 1
        self.stats.requests += len(flat)
        self.stats.largest = max(self.stats.largest, len(flat))
        self.stats.gen_s += time.perf_counter() - t0
        at = 0
        for p in batch:
            p.result = gens[at : at + len(p.requests)]
            at += len(p.requests)
            p.wake.set()
