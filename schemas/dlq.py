"""Dead-letter records on ``rs.dlq.<stage>.<run>``."""

from __future__ import annotations

import msgspec


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="dlq.v1", tag_field="kind"):
    """A message that could not be decoded or processed, with why, and the original bytes."""

    stage: str
    subject: str
    reason: str
    deliveries: int
    headers: dict[str, str]
    payload: bytes  # the original bytes, cut to what fits the broker
    time: float
    payload_size: int = 0  # the original payload's size (0 in letters written before this field)
