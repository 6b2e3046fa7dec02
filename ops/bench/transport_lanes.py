"""Lanes and phases of the transport benchmark: publish and consume through one layer, timed block
by block, every phase under a deadline.

``typed`` is ``streams.bus`` (Publisher, Consumer: encode, msg-id, decode at the edge, acks);
``raw`` is nats-py's JetStream API on the same server with the same bytes (pre-encoded, no decode),
with the same window of unacknowledged publishes in bytes (``DEFAULT_MAX_INFLIGHT_BYTES``): nats-py's
default of 4000 messages is 200 MB at 48 KB, past the stream's 128 MB ingest queue, and a publish
the stream refuses with 429 leaves its nats-py future pending forever (the reply handler raises).
Each lane has its own two connections and its own run (streams and durable consumers), so that the
two layers can be measured block by block in turn and see the same load on a shared machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from schemas.codec import scored_decoder
from schemas.trajectory import ScoredTrajectory
from streams.bus import DEFAULT_MAX_INFLIGHT_BYTES, MSG_ID, Consumer, Publisher
from streams.topology import LAKE_TRAJ, ensure, subject

LAYERS = ("raw", "typed")
CLOSE_S = 3.0
FETCH_BATCH = 256
POOL = 16  # distinct records per case, reused with fresh message ids
BLOCKS = 10  # per phase: the layers take turns this many times
R = TypeVar("R")


@dataclass(frozen=True)
class Case:
    """One record size with its message counts."""

    label: str
    record_bytes: int
    chunks: int
    count: int
    latency_count: int
    latency_rate: float  # msgs/s in the latency pass


class LaneError(RuntimeError):
    """A lane could not publish or consume: the reason becomes the error of its rows."""


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LaneError) else f"{type(exc).__name__}: {exc}"


@dataclass
class Totals:
    """Wall and CPU seconds spent by one lane in one kind of phase, and the messages moved."""

    msgs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    blocks: list[float] = field(default_factory=list)  # msgs/s of each timed block

    async def timed(self, fn: Callable[[], Awaitable[int]]) -> int:
        """Run ``fn`` (which moves messages and says how many), timed."""
        t0, c0 = time.perf_counter(), time.process_time()
        moved = await fn()
        wall = time.perf_counter() - t0
        self.wall_s += wall
        self.cpu_s += time.process_time() - c0
        self.msgs += moved
        self.blocks.append(moved / wall if wall > 0 else 0.0)
        return moved


class Lane:
    """Publish and consume through one layer on its own run."""

    def __init__(self, layer: str) -> None:
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
        self.layer = layer
        self.run = f"bench-{layer}-{uuid.uuid4().hex[:8]}"
        self.subject = subject("scored", self.run)
        self.errors: list[str] = []  # asynchronous errors the connections reported
        self.pub_nc: NATS | None = None
        self.sub_nc: NATS | None = None
        self.pub = Totals()
        self.con = Totals()
        self._raw_pending: list[asyncio.Future[Any]] = []
        self._publisher: Publisher | None = None
        self._consumer: Consumer[ScoredTrajectory] | None = None
        self._raw_js: JetStreamContext | None = None
        self._raw_sub: JetStreamContext.PullSubscription | None = None

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    async def open(self, url: str, record_bytes: int) -> Lane:
        """Connect twice (publisher, consumer), create this lane's run and bind its consumer."""
        opts: dict[str, Any] = {"max_reconnect_attempts": 2, "connect_timeout": 5, "error_cb": self._on_error}
        self.pub_nc = await nats.connect(url, **opts)
        self.sub_nc = await nats.connect(url, **opts)
        window = max(1, min(4000, DEFAULT_MAX_INFLIGHT_BYTES // record_bytes))
        pub_js = self.pub_nc.jetstream(timeout=10, publish_async_max_pending=window)
        sub_js = self.sub_nc.jetstream(timeout=10)
        await ensure(pub_js, self.run)
        if self.layer == "typed":
            self._publisher = Publisher(pub_js)
            self._consumer = await Consumer(sub_js, LAKE_TRAJ, self.run, scored_decoder).bind()
        else:
            self._raw_js = pub_js
            self._raw_sub = await sub_js.pull_subscribe_bind(
                durable=LAKE_TRAJ.durable(self.run), stream=LAKE_TRAJ.stream
            )
        return self

    def connections(self) -> list[NATS]:
        return [nc for nc in (self.pub_nc, self.sub_nc) if nc is not None and not nc.is_closed]

    async def publish(self, record: ScoredTrajectory, data: bytes, msg_id: str) -> None:
        if self._publisher is not None:
            await self._publisher.publish_async(self.subject, record, msg_id=msg_id)
        else:
            assert self._raw_js is not None, "call open() first"
            fut = await self._raw_js.publish_async(self.subject, data, headers={MSG_ID: msg_id})
            self._raw_pending.append(fut)

    async def flush(self) -> None:
        """Wait for every publish's ack; raise ``LaneError`` naming how many failed and why."""
        if self._publisher is not None:
            await self._publisher.flush()
            return
        pending, self._raw_pending = self._raw_pending, []
        waiting = set(pending)
        while waiting:
            _, waiting = await asyncio.wait(waiting, timeout=0.5)
            if waiting and self.errors:  # e.g. 429: nats-py never resolves those futures
                raise LaneError(
                    f"{len(waiting)} of {len(pending)} publishes unacknowledged, and the connection "
                    f"reported {len(self.errors)} errors, first: {self.errors[0]}"
                )
        failed = [e for e in (f.exception() for f in pending) if e is not None]
        if failed:
            first = failed[0]
            raise LaneError(
                f"{len(failed)} of {len(pending)} publishes failed: {type(first).__name__}: {first}"
            )

    async def consume(self, batch: int, timeout_s: float, on_msg: Callable[[Msg], None]) -> int:
        """Fetch up to ``batch``, ack each; returns how many arrived."""
        if self._consumer is not None:
            deliveries = await self._consumer.fetch(batch, timeout_s)
            for d in deliveries:
                on_msg(d.msg)
                await d.ack()
            return len(deliveries)
        assert self._raw_sub is not None, "call open() first"
        try:
            msgs = await self._raw_sub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, NatsTimeoutError):
            return 0
        for m in msgs:
            on_msg(m)
            await m.ack()
        return len(msgs)


async def close_lanes(lanes: list[Lane]) -> None:
    """Close every connection of ``lanes`` at once, all within ``CLOSE_S`` (a stuck broker must not
    hold the benchmark: closing flushes, which waits for the server)."""
    with anyio.move_on_after(CLOSE_S, shield=True):
        async with anyio.create_task_group() as tg:
            for lane in lanes:
                for nc in lane.connections():
                    tg.start_soon(nc.close)


# -- deadlines ---------------------------------------------------------------------------------------


async def bounded(label: str, end: float, fn: Callable[[], Awaitable[R]]) -> R:
    """``fn()`` if it finishes before the monotonic time ``end``; else ``LaneError`` naming ``label``.

    Any failure inside becomes a ``LaneError`` too (``label: Type: message``), so that it is
    reported as a row instead of ending the benchmark.
    """
    left = end - time.monotonic()
    if left <= 0:
        raise LaneError(f"{label}: skipped, the time budget is spent")
    late = f"{label}: did not finish within its deadline ({left:.1f} s)"
    scope = anyio.move_on_after(left)
    try:
        with scope:
            return await fn()
    except Exception as exc:
        if scope.cancel_called:  # some code turns its cancellation into an error of its own
            raise LaneError(f"{late}, then {type(exc).__name__}") from exc
        raise LaneError(f"{label}: {describe(exc)}"[:600]) from exc
    raise LaneError(late)


# -- phases: the lanes take turns, block by block ----------------------------------------------------


@contextmanager
def _blame(lane: Lane) -> Iterator[None]:
    """Name the layer in any error of a block."""
    try:
        yield
    except Exception as exc:
        raise LaneError(f"{lane.layer}: {describe(exc)}"[:600]) from exc


def _turns(lanes: list[Lane], block: int) -> list[Lane]:
    return lanes if block % 2 == 0 else lanes[::-1]


async def _publish_block(
    lane: Lane, lo: int, hi: int, pool: list[ScoredTrajectory], blobs: list[bytes]
) -> int:
    with _blame(lane):
        for i in range(lo, hi):
            await lane.publish(pool[i % POOL], blobs[i % POOL], f"{lane.run}-{i}")
        await lane.flush()
    return hi - lo


async def _consume_block(lane: Lane, want: int) -> int:
    got, idle = 0, 0
    with _blame(lane):
        while got < want and idle < 3:
            n = await lane.consume(min(FETCH_BATCH, want - got), 2.0, lambda m: None)
            got, idle = got + n, 0 if n else idle + 1
    return got


async def publish_phase(
    lanes: list[Lane], case: Case, pool: list[ScoredTrajectory], blobs: list[bytes]
) -> None:
    per = -(-case.count // BLOCKS)
    for b in range(BLOCKS):
        lo, hi = b * per, min(case.count, (b + 1) * per)
        for lane in _turns(lanes, b):
            await lane.pub.timed(partial(_publish_block, lane, lo, hi, pool, blobs))


async def consume_phase(lanes: list[Lane], case: Case) -> None:
    per = -(-case.count // BLOCKS)
    for b in range(BLOCKS):
        want = min(case.count, (b + 1) * per) - b * per
        for lane in _turns(lanes, b):
            await lane.con.timed(partial(_consume_block, lane, want))


class Probe:
    """Latency of one lane: when each message was sent, and when it was delivered."""

    def __init__(self, lane: Lane, count: int) -> None:
        self.lane, self.count = lane, count
        self.prefix = f"{lane.run}-lat-"
        self.sent: dict[int, float] = {}
        self.lat_ms: list[float] = []
        self.done = anyio.Event()

    def on_msg(self, m: Msg) -> None:
        msg_id = (m.headers or {}).get(MSG_ID, "")
        if msg_id.startswith(self.prefix):
            self.lat_ms.append((time.perf_counter() - self.sent[int(msg_id[len(self.prefix) :])]) * 1000.0)
            if len(self.lat_ms) >= self.count:
                self.done.set()

    async def consume(self) -> None:
        while True:
            await self.lane.consume(16, 1.0, self.on_msg)

    async def send(
        self, lo: int, hi: int, rate: float, pool: list[ScoredTrajectory], blobs: list[bytes]
    ) -> None:
        t0 = time.perf_counter()
        for i in range(lo, hi):
            delay = t0 + (i - lo) / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            self.sent[i] = time.perf_counter()
            await self.lane.publish(pool[i % POOL], blobs[i % POOL], f"{self.prefix}{i}")
        await self.lane.flush()


async def latency_phase(
    probes: list[Probe], case: Case, pool: list[ScoredTrajectory], blobs: list[bytes]
) -> None:
    """Every lane's consumer waits for deliveries while the lanes take turns sending, block by block."""
    per = -(-case.latency_count // BLOCKS)
    async with anyio.create_task_group() as tg:
        for probe in probes:
            tg.start_soon(probe.consume)
        await anyio.sleep(0.2)  # the first pull requests are waiting at the server
        for b in range(BLOCKS):
            lo, hi = b * per, min(case.latency_count, (b + 1) * per)
            for probe in probes if b % 2 == 0 else probes[::-1]:
                await probe.send(lo, hi, case.latency_rate, pool, blobs)
        for probe in probes:
            await probe.done.wait()
        tg.cancel_scope.cancel()
