"""Policy versions, stored in KV ``rs_policy`` under ``latest`` (learner -> rollout)."""

from __future__ import annotations

import msgspec


class PolicyVersion(msgspec.Struct, frozen=True, kw_only=True, tag="policy.v1", tag_field="kind"):
    """Version ``version`` of the policy, whose safetensors bytes are object ``object_name``."""

    version: int
    object_name: str
    sha256: str
    step: int
    time: float
