"""The asynchronous publishes of one publisher awaiting their stream acks, on one reply subscription.

nats-py's ``JetStreamContext.publish_async`` costs a semaphore wait, a random token (a syscall), a
future with a done-callback and a parsed ``PubAck`` per message. Here a publish is a table entry
keyed by a counter and one core publish with a reply subject; an ack pops the entry. Success acks
(``{"stream":..,"seq":..}``) are recognised without parsing; anything else is parsed and becomes
an error for ``settle()`` to return. The table is bounded in messages and bytes: the server keeps
a bounded ingest queue per stream and refuses publishes beyond it with ``429 too many requests``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

STATUS = "Status"
NO_RESPONDERS = "503"


@dataclass(slots=True)
class Sent:
    """One publish awaiting its ack: what is needed to publish it again.

    ``record`` is what the publisher encodes (not the encoded bytes: holding megabytes of fresh
    buffers per publisher would make every encode write to memory out of cache).
    """

    subject: str
    record: Any
    headers: dict[str, str]
    size: int


def ack_error(msg: Msg) -> Exception | None:
    """None for a stored (or de-duplicated) message, else the error the stream answered."""
    data = msg.data
    if b'"seq"' in data and b'"error"' not in data:
        return None
    headers = msg.headers
    if headers and headers.get(STATUS) == NO_RESPONDERS:
        return NoStreamResponseError()
    try:
        resp: Any = json.loads(data)
        if "error" not in resp:
            return None if "seq" in resp else APIError(description=f"not a publish ack: {data[:200]!r}")
        err: dict[str, Any] = resp["error"]
        APIError.from_error(err)  # raises the matching subclass
    except APIError as exc:
        return exc
    except (ValueError, TypeError, KeyError):
        return APIError(description=f"not a publish ack: {data[:200]!r}")
    return APIError(description=str(resp)[:200])


class AckTracker:
    """Publishes awaiting their ack: at most ``max_msgs`` and ``max_bytes`` of payload at once."""

    def __init__(self, nc: NATS, *, max_msgs: int, max_bytes: int, timeout_s: float) -> None:
        self._nc = nc
        self.max_msgs, self.max_bytes, self.timeout_s = max_msgs, max_bytes, timeout_s
        self._inbox = ""
        self._seq = 0
        self._inflight: dict[str, Sent] = {}
        self._bytes = 0
        self._acked = 0  # acks seen, to tell a slow broker (progress) from a silent one
        self._failed: list[tuple[Sent, Exception]] = []
        self._waiters: list[tuple[asyncio.Future[None], bool]] = []  # (future, wants all acked)
        self._starting = asyncio.Lock()

    def full(self) -> bool:
        return len(self._inflight) >= self.max_msgs or self._bytes >= self.max_bytes

    async def send(self, subject: str, data: bytes, headers: dict[str, str], record: Any) -> None:
        """Publish ``data`` (``record`` encoded) with a reply subject; the ack (or error) is
        collected in the background."""
        if not self._inbox:
            await self._start()
        self._seq += 1
        token = str(self._seq)
        self._inflight[token] = Sent(subject, record, headers, len(data))
        self._bytes += len(data)
        try:
            await self._nc.publish(subject, data, reply=self._inbox + token, headers=headers)
        except BaseException:
            self._forget(token)
            raise

    async def _start(self) -> None:
        async with self._starting:  # two first publishes at once subscribe once
            if not self._inbox:
                inbox = self._nc.new_inbox() + "."
                await self._nc.subscribe(inbox + "*", cb=self._on_ack)
                self._inbox = inbox

    def _forget(self, token: str) -> Sent | None:
        sent = self._inflight.pop(token, None)
        if sent is not None:
            self._bytes -= sent.size
        return sent

    async def _on_ack(self, msg: Msg) -> None:
        sent = self._forget(msg.subject[len(self._inbox) :])
        if sent is None:  # given up on by settle(), and published again since
            return
        self._acked += 1
        error = ack_error(msg)
        if error is not None:
            self._failed.append((sent, error))
        for waiter, drained in self._waiters:
            if not waiter.done() and (not self._inflight if drained else not self.full()):
                waiter.set_result(None)

    async def wait_for_room(self) -> bool:
        """Wait until a publish fits; False if no ack came for ``timeout_s`` (the broker is silent)."""
        return await self._wait(drained=False)

    async def settle(self) -> list[tuple[Sent, Exception]]:
        """Wait for every ack while acks keep coming; return the failed publishes with their error,
        those still unacknowledged after ``timeout_s`` without any ack as timed out."""
        if self._inflight and not await self._wait(drained=True):
            stuck = list(self._inflight.values())
            self._inflight.clear()
            self._bytes = 0
            self._failed += [(sent, NatsTimeoutError()) for sent in stuck]
        failed, self._failed = self._failed, []
        return failed

    async def _wait(self, *, drained: bool) -> bool:
        loop = asyncio.get_running_loop()
        while self._inflight if drained else self.full():
            before = self._acked
            entry = (loop.create_future(), drained)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(entry[0], self.timeout_s)
            except TimeoutError:
                if self._acked == before:
                    return False
            finally:
                self._waiters.remove(entry)
        return True
