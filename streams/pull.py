"""Pull requests for one durable JetStream consumer, answered on one core NATS subscription.

nats-py's ``PullSubscription.fetch`` awaits every message of a batch through ``next_msg``, which
costs a uuid, two tasks and a timer per message. Here a batch costs one request, one wake-up and one
timer: the subscription's callback decodes each delivery as it arrives (while its bytes are still in
the CPU cache: decoding a batch of 48 KB records after the whole batch arrived costs three times
as much) and appends it to a buffer. Each request has its own reply
subject, so a status (404 no messages, 408 expired, 409 conflict, 503 no responders) is matched to
the request it ends; one that arrives after its request is over is ignored. Deliveries that arrive
after a fetch gave up (its request still open at the server) are kept and handed out first by the
next fetch, as nats-py does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT
from nats.js.errors import APIError, ServiceUnavailableError

STATUS = "Status"
DESCRIPTION = "Description"
HEARTBEAT = "100"
# The request is over: no messages (no_wait), expired, or a conflict (max waiting exceeded, leader
# change, consumer deleted, ...): the caller sees fewer records, and fetches again.
REQUEST_OVER = frozenset({"404", "408", "409"})
NO_RESPONDERS = "503"
# The server ends a request this much before the client gives up on it, so that its 408 arrives.
EXPIRY_MARGIN_NS = 20_000_000

T = TypeVar("T")


class PullFetcher(Generic[T]):
    """Fetch decoded batches from one durable pull consumer (``$JS.API.CONSUMER.MSG.NEXT``)."""

    def __init__(
        self, nc: NATS, api_prefix: str, stream: str, durable: str, decode: Callable[[bytes], T]
    ) -> None:
        self._nc = nc
        self._decode = decode
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._seq = 0
        self._buf: deque[tuple[Msg, T | msgspec.DecodeError]] = deque()
        self._reply = ""  # reply subject of the open request; its statuses end it
        self._want = 0
        self._wake: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> PullFetcher[T]:
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(
            f"{self._inbox}.*",
            cb=self._on_msg,
            pending_msgs_limit=DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        )
        return self

    async def fetch(self, batch: int, timeout_s: float) -> list[tuple[Msg, T | msgspec.DecodeError]]:
        """Up to ``batch`` deliveries, each with its record or its decode error: those already
        here, else the first that arrive within ``timeout_s`` (then every one available, up to
        ``batch``). Raises ``ServiceUnavailableError`` when nothing serves the consumer (503) and
        ``APIError`` for any other error status."""
        if batch < 1 or timeout_s <= 0:
            raise ValueError(f"fetch needs batch >= 1 and timeout_s > 0, not {batch} and {timeout_s}")
        assert self._inbox, "call start() first"
        async with self._lock:
            if not self._buf:
                await self._pull(batch, timeout_s)
            buf = self._buf
            return [buf.popleft() for _ in range(min(batch, len(buf)))]

    async def _pull(self, batch: int, timeout_s: float) -> None:
        self._seq += 1
        self._reply = f"{self._inbox}.{self._seq}"
        self._want, self._error = batch, None
        self._wake = wake = asyncio.get_running_loop().create_future()
        # no_wait with expires: wait up to expires for the first message, then send what is
        # available (up to batch) and end the request with 404.
        expires = max(int(timeout_s * 1e9) - EXPIRY_MARGIN_NS, 1_000_000)
        body = b'{"batch":%d,"expires":%d,"no_wait":true}' % (batch, expires)
        try:
            await self._nc.publish(self._next_subject, body, reply=self._reply)
            await asyncio.wait_for(wake, timeout_s)
        except TimeoutError:
            pass
        finally:
            self._wake = None
        if self._error is not None and not self._buf:
            raise self._error

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.subject.startswith(self._inbox):  # a delivery: its subject is the stream's
            try:
                self._buf.append((msg, self._decode(msg.data)))
            except msgspec.DecodeError as exc:
                self._buf.append((msg, exc))
            if len(self._buf) >= self._want:
                self._wakeup()
            return
        if msg.subject != self._reply:  # a status of a request that is over
            return
        headers = msg.headers or {}
        code = headers.get(STATUS, "")
        if code == HEARTBEAT:
            return
        if code == NO_RESPONDERS:
            self._error = ServiceUnavailableError()
        elif code not in REQUEST_OVER:
            self._error = APIError(code=int(code or 0), description=headers.get(DESCRIPTION, ""))
        self._wakeup()

    def _wakeup(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
