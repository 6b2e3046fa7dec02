"""The typed publish/consume layer over nats-py (JetStream spoken on core NATS, see docs/streams.md).

- ``Publisher`` publishes msgspec records with ``Nats-Msg-Id`` (broker-side de-duplication), either
  awaiting each ack or asynchronously with a bounded number and size of acks in flight
  (``streams.acks``); refused (429), failed-over or unacknowledged ones are published again.
- ``Consumer`` binds a durable pull consumer (one per group and run, shared by all processes of
  the group), decodes at the edge (as each message arrives, ``streams.pull``), and sends poison to
  the dead-letter subject: a message that does not decode is dead-lettered and terminated at once;
  a message whose processing keeps failing is nak'ed with backoff and dead-lettered once its
  delivery budget is spent; a handler that raises ``PermanentError`` (e.g. ``RecordTooLarge``) has
  its message dead-lettered at once. Never a nak loop.
- Records larger than the broker accepts (``max_payload`` of the connected server, or the streams'
  ``max_msg_size``) are refused before publishing with ``RecordTooLarge``, naming size and limit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import msgspec
import stamina
import structlog
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from schemas.codec import encode, explain
from schemas.dlq import DeadLetter
from streams.acks import AckTracker
from streams.pull import PullFetcher
from streams.topology import MAX_MSG_BYTES, ConsumerSpec, subject

T = TypeVar("T")

# What a broker says while it fails over (a server gone, a stream or consumer leader being
# re-elected): retried, never surfaced. Publishing again is safe: the msg id de-duplicates.
TRANSIENT: tuple[type[Exception], ...] = (
    NatsTimeoutError,
    TimeoutError,
    NoStreamResponseError,
    ServiceUnavailableError,
    NoRespondersError,
    ConnectionReconnectingError,
)
RETRY_BUDGET_S = 60.0
TOO_MANY_REQUESTS = 429  # the stream's ingest queue is full: back off and publish again


def retryable(exc: BaseException) -> bool:
    """A failure that publishing again (same msg id) can cure: fail-over, or an overloaded stream."""
    return isinstance(exc, TRANSIENT) or (isinstance(exc, APIError) and exc.code == TOO_MANY_REQUESTS)


log = structlog.get_logger(__name__)

MSG_ID = "Nats-Msg-Id"
DEFAULT_MAX_INFLIGHT = 4096
DEFAULT_MAX_INFLIGHT_BYTES = 32 * 1024 * 1024
# A dead letter carries at most this much of the original payload, so that it fits the broker too.
DLQ_PAYLOAD_HEADROOM = 64 * 1024


class StreamError(RuntimeError):
    """Base of the errors the typed publish/consume layer raises."""


class PermanentError(StreamError):
    """Processing this message can never succeed: a handler raising it gets it dead-lettered at once."""


class RecordTooLarge(PermanentError):
    """A record whose encoded size (payload + headers) exceeds what the broker accepts."""

    def __init__(self, subject: str, size: int, limit: int) -> None:
        self.subject, self.size, self.limit = subject, size, limit
        super().__init__(
            f"record for {subject} is {size:,} bytes, over the broker limit of {limit:,} bytes "
            "(payload + headers): shrink the record, or raise max_payload in the nats-server config"
        )


def headers_size(headers: dict[str, str]) -> int:
    """Bytes the NATS/1.0 header block takes on the wire (the server counts it against max_payload)."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def broker_limit(js: JetStreamContext) -> int:
    """The largest message (payload + headers) the connected server and our streams accept."""
    return min(int(js._nc.max_payload), MAX_MSG_BYTES)


class Publisher:
    """Publish records to JetStream with de-duplication ids.

    ``max_inflight`` and ``max_inflight_bytes`` bound the async publishes awaiting their ack. They
    are a memory bound and keep the server's per-stream ingest queue from overflowing (it answers
    ``429 too many requests`` then), not admission control (that is the consumers'
    ``max_ack_pending``): a low value makes the publisher wait a round trip every so often.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        timeout_s: float = 10.0,
    ) -> None:
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError(
                f"max_inflight and max_inflight_bytes must be >= 1, not {max_inflight}, {max_inflight_bytes}"
            )
        self._js = js
        self._acks = AckTracker(
            js._nc, max_msgs=max_inflight, max_bytes=max_inflight_bytes, timeout_s=timeout_s
        )
        self._timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.republished = 0  # async publishes that failed or went unacknowledged, published again

    def _encode(self, subj: str, record: Any, headers: dict[str, str]) -> bytes:
        data = encode(record)
        limit = broker_limit(self._js)
        if len(data) + 1024 > limit:  # only then is the exact header size worth computing
            size = len(data) + headers_size(headers)
            if size > limit:
                raise RecordTooLarge(subj, size, limit)
        return data

    async def publish(
        self, subj: str, record: Any, *, msg_id: str, headers: dict[str, str] | None = None
    ) -> PubAck:
        """Publish and wait for the stream's ack. A duplicate id within the window is stored once.

        Raises ``RecordTooLarge`` (before anything is sent) if the broker would refuse the record.
        """
        hdrs = {MSG_ID: msg_id, **(headers or {})}
        data = self._encode(subj, record, hdrs)
        return await self._publish_retrying(subj, data, hdrs)

    async def _publish_retrying(self, subj: str, data: bytes, hdrs: dict[str, str]) -> PubAck:
        """Publish until acked or the retry budget is spent (broker fail-over takes seconds)."""
        async for attempt in stamina.retry_context(on=retryable, timeout=RETRY_BUDGET_S, wait_max=2.0):
            with attempt:
                return await self._js.publish(subj, data, timeout=self._timeout_s, headers=dict(hdrs))
        raise AssertionError("unreachable")

    async def publish_async(self, subj: str, record: Any, *, msg_id: str) -> None:
        """Publish without waiting for the ack; ``flush()`` waits for the acks.

        Waits while ``max_inflight`` messages (or ``max_inflight_bytes``) await their ack; if none
        comes for ``timeout_s``, settles them as ``flush()`` does. Raises ``RecordTooLarge``
        (before anything is sent) if the broker would refuse the record.
        """
        hdrs = {MSG_ID: msg_id}
        data = self._encode(subj, record, hdrs)
        if self._acks.full() and not await self._acks.wait_for_room():
            await self.flush()
        try:
            await self._acks.send(subj, data, hdrs, record)
        except TRANSIENT:
            await self._publish_retrying(subj, data, hdrs)

    async def flush(self) -> None:
        """Wait until every async publish is acknowledged, re-publishing (same msg id) those that
        failed while the broker failed over, was overloaded (429) or stayed silent for
        ``timeout_s``; then raise the first permanent failure."""
        failed = await self._acks.settle()
        retry = [(sent, error) for sent, error in failed if retryable(error)]
        if retry:
            log.info("publish_again", count=len(retry), error=repr(retry[0][1])[:200])
        for sent, _ in retry:
            data = self._encode(sent.subject, sent.record, sent.headers)
            await self._publish_retrying(sent.subject, data, sent.headers)
            self.republished += 1
        for _, error in failed:
            if not retryable(error):
                raise error


@dataclass(slots=True)
class Delivery(Generic[T]):
    """One decoded message with its ack handle."""

    record: T
    msg: Msg

    @property
    def deliveries(self) -> int:
        return int(self.msg.metadata.num_delivered)

    async def ack(self) -> None:
        await self.msg.ack()

    async def ack_sync(self, timeout_s: float = 5.0) -> None:
        """Ack and wait for the broker to confirm it (for effects that must not repeat on failover)."""
        await self.msg.ack_sync(timeout=timeout_s)

    async def in_progress(self) -> None:
        """Heartbeat: reset the ack timer while long work (an episode) goes on."""
        await self.msg.in_progress()


async def heartbeat(delivery: Delivery[Any], every_s: float) -> None:
    """Reset ``delivery``'s ack timer every ``every_s`` until cancelled (long work in progress)."""
    while True:
        await anyio.sleep(every_s)
        await delivery.in_progress()


@dataclass
class ConsumerStats:
    """What this process's consumer did, for summary log lines and tests."""

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
        self._puller: PullFetcher[T] | None = None

    async def bind(self) -> Consumer[T]:
        """Bind to the durable consumer that ``streams.topology.ensure`` created."""
        durable = self.spec.durable(self.run)
        puller = PullFetcher(self.js._nc, self.js._prefix, self.spec.stream, durable, self.decoder.decode)
        self._puller = await puller.start()
        return self

    async def fetch(self, batch: int, timeout_s: float) -> list[Delivery[T]]:
        """Up to ``batch`` decoded records; poison is dead-lettered and never returned."""
        assert self._puller is not None, "call bind() first"
        try:
            fetched = await self._puller.fetch(batch, timeout_s)
        except TRANSIENT as exc:  # fail-over in progress: nothing to hand out yet
            log.info("fetch_retry", stage=self.stage, error=type(exc).__name__)
            await anyio.sleep(0.5)
            return []
        self.stats.received += len(fetched)
        out: list[Delivery[T]] = []
        for msg, record in fetched:  # decoded on arrival (streams.pull)
            if isinstance(record, msgspec.DecodeError):  # poison: never returned, never retried
                await self.dead_letter(msg, f"decode: {explain(self.decoder, record)}")
            else:
                out.append(Delivery(record, msg))
        return out

    async def fail(self, delivery: Delivery[T], reason: str, *, permanent: bool = False) -> None:
        """Processing failed: retry later with backoff, or dead-letter once the budget is spent.

        ``permanent`` failures (retrying cannot help) are dead-lettered at once.
        """
        n = delivery.deliveries
        if permanent:
            await self.dead_letter(delivery.msg, f"permanent failure: {reason}")
            return
        if n >= self.spec.max_deliver:
            await self.dead_letter(delivery.msg, f"failed {n} times: {reason}")
            return
        delay = self.backoff_s[min(n - 1, len(self.backoff_s) - 1)]
        self.stats.naked += 1
        await delivery.msg.nak(delay=delay)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Publish the message to ``rs.dlq.<stage>.<run>`` with why, then terminate it.

        The original payload is kept up to what fits the broker; ``payload_size`` keeps its size.
        """
        room = max(0, broker_limit(self.js) - DLQ_PAYLOAD_HEADROOM)
        record = DeadLetter(
            stage=self.stage,
            subject=msg.subject,
            reason=reason[:2000],
            deliveries=int(msg.metadata.num_delivered),
            headers={k[:256]: str(v)[:1024] for k, v in list((msg.headers or {}).items())[:32]},
            payload=msg.data[:room],
            time=time.time(),
            payload_size=len(msg.data),
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
    backoff or dead-lettered (at once for ``PermanentError``); it acks itself on success.
    """
    slots = anyio.Semaphore(concurrency)

    async def one(d: Delivery[T]) -> None:
        try:
            await handle(d)
        except PermanentError as exc:
            log.warning("handler_failed_permanently", stage=consumer.stage, error=str(exc)[:200])
            await consumer.fail(d, f"{type(exc).__name__}: {exc}", permanent=True)
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
