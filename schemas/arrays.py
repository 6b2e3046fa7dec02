"""Compact raw arrays for hot-path payloads (token ids, log-probabilities).

Token ids travel as little-endian int32 bytes and log-probabilities as little-endian float32 bytes:
a msgpack ``bin`` field decodes without touching each element, ~100x faster than ``list[int]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")


def pack_tokens(tokens: Sequence[int] | npt.NDArray[np.integer]) -> bytes:
    """Encode token ids as int32 bytes."""
    return np.asarray(tokens, dtype=TOKEN_DTYPE).tobytes()


def unpack_tokens(raw: bytes) -> npt.NDArray[np.int32]:
    """Decode int32 bytes into a read-only array of token ids (no copy)."""
    return np.frombuffer(raw, dtype=TOKEN_DTYPE)


def pack_logprobs(values: Sequence[float] | npt.NDArray[np.floating]) -> bytes:
    """Encode log-probabilities as float32 bytes."""
    return np.asarray(values, dtype=LOGPROB_DTYPE).tobytes()


def unpack_logprobs(raw: bytes) -> npt.NDArray[np.float32]:
    """Decode float32 bytes into a read-only array of log-probabilities (no copy)."""
    return np.frombuffer(raw, dtype=LOGPROB_DTYPE)
