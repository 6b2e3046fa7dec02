"""Settings of the rollout group (``[rollout]``, with its ``[rollout.harness]``) and of the reward
group (``[reward]``), decoded once and passed down; ``ops.config`` composes them."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agent_harness.agent_runner import NO_ARGV, AgentCommandSettings
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
        float, msgspec.Meta(gt=0, description="Seconds between in_progress heartbeats of a long episode.")
    ] = 20.0
    harness: HarnessSettings = HarnessSettings()
    agent: Annotated[
        Literal["builtin", "command"],
        msgspec.Meta(
            description="Who acts in an episode: the built-in loop, or the external agent program of "
            "[rollout.agent_command] calling the policy through the model proxy (docs/agents.md)."
        ),
    ] = "builtin"
    agent_command: AgentCommandSettings = AgentCommandSettings()

    def __post_init__(self) -> None:
        if self.agent == "command" and not self.agent_command.argv:
            raise ValueError(NO_ARGV)


class RewardSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one reward process verifies."""

    concurrency: Annotated[
        int, msgspec.Meta(ge=1, description="Trajectories one reward process verifies at once.")
    ] = 4
    verify_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="Limit of one verify command; a hang is an infra failure.")
    ] = 20.0
    probe: ProbeSettings = ProbeSettings()
