"""Policy versions in KV ``rs_policy`` and weights in object store ``rs_weights``.

The learner publishes weights to the object store first, then moves ``<run>.latest`` in KV, so a
reader that sees a version can always fetch its weights. Readers verify the sha256.

Readers that follow the learner use ``fetch_newest``: one pass to the newest announced version,
however many were published meanwhile. The learner deletes old versions' weights, so a version
announced a moment ago may be gone by the time its chunks are read (nats-py's ``get`` then waits
for chunks that never come): a fetch is bounded by a deadline sized to the object, and a fetch
that fails while a newer version exists moves on to that one instead of retrying the old one.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import TypeVar

import anyio
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from schemas.codec import encode, policy_decoder
from schemas.policy import PolicyVersion
from streams.bus import TRANSIENT
from streams.kv import kv_get, kv_put, retrying
from streams.topology import POLICY_BUCKET, WEIGHTS_BUCKET, policy_key, weights_object

T = TypeVar("T")


class WeightsCorrupt(RuntimeError):
    """Weights read from the object store do not match the published checksum."""


async def publish_weights(
    js: JetStreamContext, run: str, version: int, data: bytes, *, step: int
) -> PolicyVersion:
    """Store the weights, then announce the version (in that order)."""
    name = weights_object(run, version)

    async def put_weights() -> None:
        obs = await js.object_store(WEIGHTS_BUCKET)
        await obs.put(name, data)

    await retrying(put_weights, attempt_timeout_s=120.0)
    record = PolicyVersion(
        version=version,
        object_name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        step=step,
        time=time.time(),
    )

    await kv_put(js, POLICY_BUCKET, policy_key(run), encode(record))
    return record


async def latest(js: JetStreamContext, run: str) -> PolicyVersion | None:
    """The latest announced version of this run's policy, or None before the first publication."""

    value = await kv_get(js, POLICY_BUCKET, policy_key(run))
    return None if value is None else policy_decoder.decode(value)


async def fetch_weights(js: JetStreamContext, record: PolicyVersion) -> bytes:
    """Read the weights of ``record`` and check them against its sha256."""

    async def get() -> bytes:
        return await _read_object(await js.object_store(WEIGHTS_BUCKET), record.object_name)

    data = await retrying(get, attempt_timeout_s=120.0)
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise WeightsCorrupt(f"weights {record.object_name} do not match sha256 {record.sha256[:12]}")
    return data


async def _read_object(obs: ObjectStore, name: str) -> bytes:
    """An object's bytes, gathered in a buffer: nats-py's ``get`` without ``writeinto`` appends
    each chunk to a ``bytes`` (quadratic: an 80 MB object took minutes)."""
    buffer = io.BytesIO()
    await obs.get(name, writeinto=buffer)
    return buffer.getvalue()


FETCH_BASE_S = 10.0
FETCH_BYTES_PER_S = 20e6  # a floor on object-store throughput, to size a fetch's deadline
GONE: tuple[type[Exception], ...] = (
    ObjectNotFoundError,
    ObjectDeletedError,
    NotFoundError,
    TimeoutError,
    WeightsCorrupt,
    *TRANSIENT,
)


class FetchFailed(RuntimeError):
    """The newest announced weights could not be read (after moving on to newer ones)."""


async def _fetch_once(js: JetStreamContext, record: PolicyVersion) -> bytes:
    """Read ``record``'s weights once, within a deadline sized to the object (no retry)."""
    obs = await js.object_store(WEIGHTS_BUCKET)
    info = await obs.get_info(record.object_name)
    with anyio.fail_after(FETCH_BASE_S + (info.size or 0) / FETCH_BYTES_PER_S):
        data = await _read_object(obs, record.object_name)
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise WeightsCorrupt(f"weights {record.object_name} do not match sha256 {record.sha256[:12]}")
    return data


async def fetch_newest(
    js: JetStreamContext, run: str, *, newer_than: int, attempts: int = 5
) -> tuple[PolicyVersion, bytes] | None:
    """The newest announced version and its weights, or None if none is newer than ``newer_than``.

    Skips every version between: a burst of publications costs one fetch. A read that fails (the
    object deleted under it, a deadline, a broker fail-over) re-reads ``latest`` and tries the
    newest again, up to ``attempts`` times with backoff.
    """
    last: Exception | None = None
    for attempt in range(attempts):
        record = await latest(js, run)
        if record is None or record.version <= newer_than:
            return None
        try:
            return record, await _fetch_once(js, record)
        except GONE as exc:
            last = exc
            await anyio.sleep(min(0.2 * 2**attempt, 2.0))
    raise FetchFailed(f"weights of run {run} unreadable after {attempts} attempts: {last!r}") from last


async def delete_weights(js: JetStreamContext, run: str, version: int) -> None:
    """Remove an old version's weights (readers never need versions older than latest - eta)."""
    obs = await js.object_store(WEIGHTS_BUCKET)
    try:
        await obs.delete(weights_object(run, version))
    except (NotFoundError, Exception):  # noqa: BLE001 - already gone is fine
        pass
