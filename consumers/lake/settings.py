"""Settings of the lake writer (section ``[lake]``), decoded once and passed down; ``ops.config``
composes them and resolves ``path`` against ``state_dir``."""

from __future__ import annotations

from typing import Annotated

import msgspec


class LakeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the lake lives and how often the writer flushes."""

    path: Annotated[str, msgspec.Meta(description="Lake root; relative paths are under state_dir.")] = "lake"
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, description="Seconds between flushes.")] = 5.0
    max_batch: Annotated[int, msgspec.Meta(ge=1, description="Flush when this many messages wait.")] = 512
