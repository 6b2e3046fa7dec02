"""Settings of the rollout group (``[rollout]``, with its ``[rollout.harness]``) and of the reward
group (``[reward]``), decoded once and passed down; ``ops.config`` composes them."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agent_harness.settings import HarnessSettings
from consumers.probe import ProbeSettings


class RolloutSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one rollout process generates: its engine, its concurrency, the agent loop's budgets."""

    concurrency: Annotated[
        int, msgspec.Meta(ge=1, description="Episodes one rollout process runs at once.")
    ] = 4
    engine: Annotated[Literal["torch", "sglang"], msgspec.Meta(description="Inference engine.")] = "torch"
    sglang_url: Annotated[str, msgspec.Meta(description="sglang server URL when engine = sglang.")] = ""
    heartbeat_s: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds between in_progress heartbeats (and sandbox keepalives) of an episode; "
            "a dead worker's task is redelivered after 2 of them, its sandboxes close after 3.",
        ),
    ] = 10.0
    harness: HarnessSettings = HarnessSettings()


class RewardSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one reward process verifies."""

    concurrency: Annotated[
        int, msgspec.Meta(ge=1, description="Trajectories one reward process verifies at once.")
    ] = 4
    verify_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="Limit of one verify command; a hang is an infra failure.")
    ] = 20.0
    heartbeat_s: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds between in_progress heartbeats while verifying; a dead worker's "
            "trajectory is redelivered after 2 of them.",
        ),
    ] = 10.0
    probe: ProbeSettings = ProbeSettings()
