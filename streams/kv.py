"""Broker calls that outlive a fail-over: ``retrying`` and the KV reads and writes built on it.

Every KV bucket access of a worker (tasks, policy versions, episodes, the producer's cursor) goes
through here, so each is bounded per try and retried on what a broker fail-over throws.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import stamina
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from streams.bus import RETRY_BUDGET_S, TRANSIENT

T = TypeVar("T")


async def retrying(op: Callable[[], Awaitable[T]], *, attempt_timeout_s: float = 30.0) -> T:
    """Run ``op`` until it succeeds, retrying what a broker fail-over throws (each try bounded)."""
    async for attempt in stamina.retry_context(on=TRANSIENT, timeout=RETRY_BUDGET_S, wait_max=2.0):
        with attempt:
            with anyio.fail_after(attempt_timeout_s):
                return await op()
    raise AssertionError("unreachable")


async def kv_get(
    js: JetStreamContext, bucket: str, key: str, *, attempt_timeout_s: float = 30.0
) -> bytes | None:
    """The value under ``key`` in ``bucket``, or None if there is none (never written, deleted)."""

    async def get() -> bytes | None:
        kv = await js.key_value(bucket)
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        return entry.value

    return await retrying(get, attempt_timeout_s=attempt_timeout_s)


async def kv_put(
    js: JetStreamContext, bucket: str, key: str, value: bytes, *, attempt_timeout_s: float = 30.0
) -> None:
    """Write ``value`` under ``key`` in ``bucket`` (idempotent: a retry writes the same value)."""

    async def put() -> None:
        kv = await js.key_value(bucket)
        await kv.put(key, value)

    await retrying(put, attempt_timeout_s=attempt_timeout_s)


async def kv_delete(js: JetStreamContext, bucket: str, key: str) -> None:
    """Delete ``key`` from ``bucket`` (a delete marker; reads then give None)."""

    async def delete() -> None:
        kv = await js.key_value(bucket)
        await kv.delete(key)

    await retrying(delete)
