"""Settings of the agent loop (decoded once from ``rollstream.toml`` and flags, passed down)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class HarnessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Budgets of one episode: tokens per turn and in total, observation size, time."""

    max_new_tokens_per_turn: Annotated[
        int, msgspec.Meta(ge=1, description="Tokens the policy may generate in one turn.")
    ] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0.0, description="Sampling temperature (0 = greedy).")] = (
        1.0
    )
    max_total_tokens: Annotated[
        int,
        msgspec.Meta(ge=16, description="Budget of the whole sequence (prompt, actions, observations)."),
    ] = 1024
    max_observation_tokens: Annotated[
        int,
        msgspec.Meta(ge=8, description="Longer tool outputs keep their head and tail and drop the middle."),
    ] = 128
    min_turn_tokens: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="Tokens kept free for the next turn: an observation is cut (head and tail) to "
            "leave them; when it cannot be, the episode ends as truncated (context_budget).",
        ),
    ] = 16
    seed: Annotated[
        int,
        msgspec.Meta(
            description="Mixed with the episode's id and the turn into each generation's sampling seed: "
            "the same weights sample the same actions for the same episode whatever shares their batch "
            "(reproducible evaluations; resumed under the same version, an episode redraws its lost turn).",
        ),
    ] = 0
    batch_max_wait_ms: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            description="Longest a generation request waits for other episodes' requests to share "
            "its batch (the batch size is capped by rollout.concurrency).",
        ),
    ] = 5.0
    command_timeout_s: Annotated[
        float, msgspec.Meta(gt=0.0, description="Wall-clock limit of one bash command in the sandbox.")
    ] = 10.0
    episode_timeout_s: Annotated[
        float, msgspec.Meta(gt=0.0, description="Wall-clock limit of one episode; then it is truncated.")
    ] = 300.0
    sandbox_ttl_s: Annotated[
        float,
        msgspec.Meta(gt=0.0, description="TTL asked of sandboxd; the reward worker closes it earlier."),
    ] = 900.0
    sandbox_wait_s: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            description="How long an episode waits for a free sandbox slot (sandboxd at max_sandboxes, "
            "e.g. while the reward group verifies earlier episodes) before it is aborted.",
        ),
    ] = 120.0


class LoraSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[policy] lora``: train low-rank adapters instead of every weight; only they travel."""

    r: Annotated[int, msgspec.Meta(ge=1, description="Rank of the adapters.")] = 8
    alpha: Annotated[int, msgspec.Meta(ge=1, description="Scale numerator: updates weigh alpha / r.")] = 16
    target_modules: Annotated[
        list[str], msgspec.Meta(min_length=1, description="Linear layers (by name) that get adapters.")
    ] = msgspec.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    @property
    def scale(self) -> float:
        return self.alpha / self.r
