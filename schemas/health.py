"""A worker's health report: the errors it keeps hitting (every worker -> supervisor, core NATS
``rs.ops.health.<run>``)."""

from __future__ import annotations

import msgspec


class WorkerHealth(msgspec.Struct, frozen=True, kw_only=True, tag="health.v1", tag_field="kind"):
    """The error tally of one worker process so far, sent when it changes.

    ``errors`` maps an error's key (``permissions violation for rs.sandbox.create``, or a log event
    and its error text) to how often this process hit it; ``fatal`` is set on the last report of a
    process that exits because of that error."""

    worker: str
    pid: int
    host: str
    errors: dict[str, int]
    fatal: str = ""
    time: float


health_decoder = msgspec.msgpack.Decoder(WorkerHealth)
health_encoder = msgspec.msgpack.Encoder()
