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
    engine: Annotated[
        Literal["torch", "sglang", "openai"],
        msgspec.Meta(
            description=(
                "Inference engine: torch (in process), sglang (an sglang server's native /generate) or "
                "openai (OpenAI-compatible completions servers returning token ids and logprobs: "
                "rollstream serve, vLLM)."
            )
        ),
    ] = "torch"
    sglang_url: Annotated[str, msgspec.Meta(description="sglang server URL when engine = sglang.")] = ""
    openai_urls: Annotated[
        list[str],
        msgspec.Meta(
            description=(
                "Base URLs (http://host:port/v1) of the completions servers when engine = openai; an "
                "episode sticks to one of them. Empty under `just up` with processes.serve > 0: the "
                "rollstream serve processes it starts."
            )
        ),
    ] = []
    openai_model: Annotated[str, msgspec.Meta(description="`model` sent to the openai servers.")] = ""
    reload_path: Annotated[
        str,
        msgspec.Meta(
            description=(
                "Weight-reload endpoint of the openai servers (POST {model_path, weight_version} at the "
                "server root): sglang's and rollstream serve's /update_weights_from_disk."
            )
        ),
    ] = "/update_weights_from_disk"
    weights_dir: Annotated[
        str,
        msgspec.Meta(
            description=(
                "A directory the rollout workers and the inference servers both see, where new policy "
                "versions are written for the servers to load (empty: <state_dir>/weights/<run>)."
            )
        ),
    ] = ""
    heartbeat_s: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds between in_progress heartbeats (and sandbox keepalives) of an episode; "
            "a dead worker's task is redelivered after 2 of them, its sandboxes close after 3.",
        ),
    ] = 10.0
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
    heartbeat_s: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds between in_progress heartbeats while verifying; a dead worker's "
            "trajectory is redelivered after 2 of them.",
        ),
    ] = 10.0
    probe: ProbeSettings = ProbeSettings()
