"""The typed publish/consume layer over nats-py JetStream.

- ``Publisher`` publishes msgspec records with ``Nats-Msg-Id`` (broker-side de-duplication), either
  awaiting each ack or asynchronously with a bounded number of acks in flight.
- ``Consumer`` binds a durable pull consumer (one per group and run, shared by all processes of
  the group), decodes at the edge, and sends poison to the dead-letter subject: a message that does
  not decode is dead-lettered and terminated at once; a message whose processing keeps failing is
  nak'ed with backoff and dead-lettered once its delivery budget is spent. Never a nak loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.codec import encode
from schemas.dlq import DeadLetter
from streams.topology import ConsumerSpec, subject

T = TypeVar("T")
log = structlog.get_logger(__name__)

MSG_ID = "Nats-Msg-Id"


class Publisher:
    """Publish records to JetStream with de-duplication ids."""

    def __init__(self, js: JetStreamContext, *, max_inflight: int = 256, timeout_s: float = 10.0) -> None:
        self._js = js
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: set[asyncio.Future[PubAck]] = set()
        self._timeout_s = timeout_s

    async def publish(
        self, subj: str, record: Any, *, msg_id: str, headers: dict[str, str] | None = None
    ) -> PubAck:
        """Publish and wait for the stream's ack. A duplicate id within the window is stored once."""
        hdrs = {MSG_ID: msg_id, **(headers or {})}
        return await self._js.publish(subj, encode(record), timeout=self._timeout_s, headers=hdrs)

    async def publish_async(self, subj: str, record: Any, *, msg_id: str) -> None:
        """Publish without waiting for the ack; at most ``max_inflight`` acks are outstanding."""
        await self._slots.acquire()
        try:
            fut = await self._js.publish_async(subj, encode(record), headers={MSG_ID: msg_id})
        except BaseException:
            self._slots.release()
            raise
        self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[PubAck]) -> None:
        self._pending.discard(fut)
        self._slots.release()

    async def flush(self) -> None:
        """Wait until every async publish is acknowledged; raise the first failure."""
        if self._pending:
            results = await asyncio.gather(*list(self._pending), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result


@dataclass
class Delivery(Generic[T]):
    """One decoded message with its ack handle."""

    record: T
    msg: Msg

    @property
    def deliveries(self) -> int:
        return int(self.msg.metadata.num_delivered)

    async def ack(self) -> None:
        await self.msg.ack()

    async def in_progress(self) -> None:
        """Heartbeat: reset the ack timer while long work (an episode) goes on."""
        await self.msg.in_progress()


@dataclass
class ConsumerStats:
    received: int = 0
    dead_lettered: int = 0
    naked: int = 0


class Consumer(Generic[T]):
    """A bound durable pull consumer that yields decoded records."""

    def __init__(
        self,
        js: JetStreamContext,
        spec: ConsumerSpec,
        run: str,
        decoder: msgspec.msgpack.Decoder[T],
        *,
        stage: str | None = None,
        backoff_s: Sequence[float] = (1.0, 5.0, 15.0),
    ) -> None:
        self.js = js
        self.spec = spec
        self.run = run
        self.decoder = decoder
        self.stage = stage or spec.group
        self.backoff_s = tuple(backoff_s)
        self.stats = ConsumerStats()
        self._sub: JetStreamContext.PullSubscription | None = None

    async def bind(self) -> Consumer[T]:
        """Bind to the durable consumer that ``streams.topology.ensure`` created."""
        self._sub = await self.js.pull_subscribe_bind(
            durable=self.spec.durable(self.run), stream=self.spec.stream
        )
        return self

    async def fetch(self, batch: int, timeout_s: float) -> list[Delivery[T]]:
        """Up to ``batch`` decoded records; poison is dead-lettered and never returned."""
        assert self._sub is not None, "call bind() first"
        try:
            msgs = await self._sub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, NatsTimeoutError):
            return []
        out: list[Delivery[T]] = []
        for msg in msgs:
            self.stats.received += 1
            try:
                record = self.decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self.dead_letter(msg, f"decode: {exc}")
                continue
            out.append(Delivery(record, msg))
        return out

    async def fail(self, delivery: Delivery[T], reason: str) -> None:
        """Processing failed: retry later with backoff, or dead-letter once the budget is spent."""
        n = delivery.deliveries
        if n >= self.spec.max_deliver:
            await self.dead_letter(delivery.msg, f"failed {n} times: {reason}")
            return
        delay = self.backoff_s[min(n - 1, len(self.backoff_s) - 1)]
        self.stats.naked += 1
        await delivery.msg.nak(delay=delay)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Publish the message to ``rs.dlq.<stage>.<run>`` with why, then terminate it."""
        record = DeadLetter(
            stage=self.stage,
            subject=msg.subject,
            reason=reason[:2000],
            deliveries=int(msg.metadata.num_delivered),
            headers={k: str(v) for k, v in (msg.headers or {}).items()},
            payload=msg.data[: 1 << 20],
            time=time.time(),
        )
        seq = msg.metadata.sequence.stream
        await self.js.publish(
            subject(f"dlq.{self.stage}", self.run),
            encode(record),
            headers={MSG_ID: f"dlq:{self.stage}:{seq}"},
        )
        await msg.term()
        self.stats.dead_lettered += 1
        log.warning("dead_lettered", stage=self.stage, subject=msg.subject, reason=reason[:200])

    async def pending(self) -> tuple[int, int, int]:
        """(num_pending, num_ack_pending, num_redelivered) as the broker sees them."""
        return await backlog(self.js, self.spec, self.run)


async def backlog(js: JetStreamContext, spec: ConsumerSpec, run: str) -> tuple[int, int, int]:
    """(num_pending, num_ack_pending, num_redelivered) of a group's consumer, as the broker sees them."""
    info = await js.consumer_info(spec.stream, spec.durable(run))
    return int(info.num_pending or 0), int(info.num_ack_pending or 0), int(info.num_redelivered or 0)


async def serve(
    consumer: Consumer[T],
    concurrency: int,
    handle: Callable[[Delivery[T]], Awaitable[None]],
    *,
    fetch_timeout_s: float = 2.0,
) -> None:
    """Process deliveries with at most ``concurrency`` handlers at once, until cancelled.

    Fetches only as many messages as there are free handler slots (the rest stay with the broker
    for other processes of the group). A handler that raises has its message retried with
    backoff or dead-lettered; it acks itself on success.
    """
    slots = anyio.Semaphore(concurrency)

    async def one(d: Delivery[T]) -> None:
        try:
            await handle(d)
        except Exception as exc:
            log.exception("handler_failed", stage=consumer.stage)
            await consumer.fail(d, f"{type(exc).__name__}: {exc}")
        finally:
            slots.release()

    async with anyio.create_task_group() as tg:
        while True:
            await slots.acquire()  # one free slot, then every other free one
            held = 1
            while slots.value > 0:
                slots.acquire_nowait()
                held += 1
            deliveries = await consumer.fetch(held, timeout_s=fetch_timeout_s)
            for _ in range(held - len(deliveries)):
                slots.release()
            for d in deliveries:
                tg.start_soon(one, d)
