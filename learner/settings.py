"""Learner settings, decoded once from ``rollstream.toml`` (section ``[learner]``) and flags."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

LossName = Literal["ipa", "grpo", "sft"]
FlaggedPolicy = Literal["drop", "train", "negative"]


class LearnerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the learner admits samples, computes its loss and steps the optimiser."""

    max_staleness: Annotated[
        int, msgspec.Meta(ge=0, description="η: train a sample only if N − min(chunk version) ≤ η.")
    ] = 2
    batch_size: Annotated[int, msgspec.Meta(ge=1, description="Samples per optimiser step.")] = 8
    batch_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="Step with a partial batch after this many seconds.")
    ] = 20.0
    group_timeout_s: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description=(
                "With task groups (producer.group_size > 1) a batch holds whole groups; a group still "
                "incomplete this many seconds after its first member arrived is trained as it is."
            ),
        ),
    ] = 30.0
    dynamic_sampling: Annotated[
        bool,
        msgspec.Meta(
            description=(
                "Dynamic sampling (DAPO): drop a complete task group whose rewards are all equal (its "
                "group-normalised advantages are all 0) before it enters a batch, and keep filling the "
                "batch from informative groups. Counted in train_steps.filtered_groups."
            )
        ),
    ] = False
    lr: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="AdamW learning rate (online; 3e-4 and above degraded the warm-started policy).",
        ),
    ] = 1e-4
    weight_decay: Annotated[float, msgspec.Meta(ge=0, description="AdamW weight decay.")] = 0.0
    grad_clip: Annotated[
        float, msgspec.Meta(gt=0, description="Clip the global gradient norm to this value.")
    ] = 1.0
    grad_accum: Annotated[
        int,
        msgspec.Meta(ge=1, description="Split each batch into this many micro-batches (one optimiser step)."),
    ] = 1
    gamma: Annotated[
        float, msgspec.Meta(ge=0, le=1, description="Chunk discount γ in G_k = Σ_{j≥k} γ^{j−k} r_j.")
    ] = 1.0
    loss: Annotated[LossName, msgspec.Meta(description="Default loss: ipa, grpo (baseline) or sft.")] = "ipa"
    ipa_surrogate: Annotated[
        Literal["weighted", "ppo_clip"],
        msgspec.Meta(
            description="weighted: the IPA two-branch loss; ppo_clip: chunk-level PPO clipped surrogate."
        ),
    ] = "weighted"
    ipa_failure_is: Annotated[
        bool,
        msgspec.Meta(
            description="IPA weighted surrogate: weight a failure's chunks by their clipped importance "
            "ratio sg(clip(rho_k, 0, 1)); false is the ablation without it (weight 1)."
        ),
    ] = True
    ppo_clip_eps: Annotated[
        float, msgspec.Meta(gt=0, lt=1, description="ε of the PPO clip (IPA ppo_clip and GRPO).")
    ] = 0.2
    group_baseline: Annotated[
        bool,
        msgspec.Meta(
            description="IPA: replace R by (R − group mean) / (group std + eps) per group_id before returns."
        ),
    ] = False
    failure_reward: Annotated[
        float,
        msgspec.Meta(
            le=0,
            description=(
                "Added to the reward of every failed trajectory (reward ≤ 0), so that with 0/1 rewards "
                "a failure trains with this reward. 0 leaves rewards as scored."
            ),
        ),
    ] = 0.0
    flagged: Annotated[
        FlaggedPolicy,
        msgspec.Meta(
            description=(
                "What to do with a sample the reward group's security screen flagged (egress, "
                "reverse_shell, miner, leftover_process, ...; ScoredTrajectory.flags): drop it (train "
                "log reason 'flagged', the flags in detail), train it as scored, or train it as a "
                "failure with reward flagged_reward (negative)."
            )
        ),
    ] = "drop"
    flagged_reward: Annotated[
        float,
        msgspec.Meta(
            le=0,
            description=(
                "The reward a flagged sample trains with under flagged = negative (per-chunk rewards "
                "are discarded; failure_reward is added to it as to any failure)."
            ),
        ),
    ] = -1.0
    mask_errors: Annotated[
        bool, msgspec.Meta(description="Mask chunks whose tool call errored or failed to parse.")
    ] = True
    mismatch_ratio_low: Annotated[
        float, msgspec.Meta(ge=0, description="Mask a chunk whose ratio ρ_k is below this bound.")
    ] = 0.0
    mismatch_ratio_high: Annotated[
        float, msgspec.Meta(gt=0, description="Mask a chunk whose ratio ρ_k is above this bound.")
    ] = 10.0
    mismatch_max_prob_gap: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=1,
            description="Mask a chunk whose mean |π_θ(y_t) − π_b(y_t)| over its tokens exceeds this.",
        ),
    ] = 1.0
    sft_success_only: Annotated[
        bool, msgspec.Meta(description="SFT imitates only trajectories with reward > 0.")
    ] = True
    publish_every: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description=(
                "Publish a new policy version once this many optimiser steps passed since the last "
                "one (0: steps never trigger a publication; use publish_every_s)."
            ),
        ),
    ] = 1
    publish_every_s: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description=(
                "Publish a new policy version once this many seconds passed since the last one and at "
                "least one step was taken (0: time never triggers a publication). Either trigger "
                "publishes; publish_every = 0 with publish_every_s = S publishes at most every S s."
            ),
        ),
    ] = 0.0
    checkpoint_every: Annotated[
        int, msgspec.Meta(ge=1, description="Write a checkpoint every this many steps.")
    ] = 10
    seed: Annotated[int, msgspec.Meta(ge=0, description="Seed for torch (initialisation, sampling).")] = 0
    warm_start_steps: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description=(
                "SFT steps of the replay warm start on the lake's successful expert trajectories, run "
                "before online training when the run has no checkpoint yet. 0 disables the warm start."
            ),
        ),
    ] = 1000
    warm_start_lr: Annotated[
        float, msgspec.Meta(gt=0, description="Learning rate of the warm start's SFT steps.")
    ] = 3e-3
    warm_start_final_lr: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            le=1,
            description="The warm start's learning rate at its last step, as a fraction of "
            "warm_start_lr (linear decay; 1: constant).",
        ),
    ] = 0.1
    warm_start_batch: Annotated[
        int, msgspec.Meta(ge=1, description="Demonstrations per SFT step of the warm start.")
    ] = 16
    seed_episodes: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description=(
                "Scripted-expert episodes (built-in tasks only) the warm start publishes into the lake "
                "first; those the lake already holds are not run again. 0: use the lake as it is. "
                "The tiny default policy learns to copy words from ~350 successful demonstrations; "
                "from ~120 it memorises task-word pairs and stays near 60 %."
            ),
        ),
    ] = 480
    seed_error_rate: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=1,
            description="Probability that the scripted expert errs once in an episode (some demos fail).",
        ),
    ] = 0.3

    def __post_init__(self) -> None:
        if self.publish_every == 0 and self.publish_every_s == 0:
            raise msgspec.ValidationError(
                "learner.publish_every and learner.publish_every_s are both 0, so no version would "
                "ever be published; set one of them (steps or seconds)."
            )
        if self.mismatch_ratio_low >= self.mismatch_ratio_high:
            raise msgspec.ValidationError(
                "learner.mismatch_ratio_low must be below learner.mismatch_ratio_high; "
                f"got {self.mismatch_ratio_low} ≥ {self.mismatch_ratio_high}."
            )
