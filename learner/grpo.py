"""Baseline losses: token-level GRPO (the comparison for IPA) and SFT (replay warm-start).

Both average over action tokens of the whole batch and, like IPA, drop the tokens of chunks whose
tool call errored or failed to parse when ``mask_errors`` is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from learner.ipa import LossStats, LossTerms, group_normalise, token_keep_mask

if TYPE_CHECKING:
    from learner.batch import Batch
    from learner.settings import LearnerSettings


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean of ``values`` over ``mask`` (0 if empty) and the per-sample means (detached)."""
    masked = torch.where(mask, values, 0.0)
    loss = masked.sum() / mask.sum().clamp(min=1)
    per_sample = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).detach()
    return loss, per_sample


def grpo_terms(logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings) -> LossTerms:
    """PPO-clip on token ratios ``π_θ/π_b`` with advantages ``(R − group mean)/(group std + eps)``."""
    mask = token_keep_mask(batch, settings)
    adv = group_normalise(batch.rewards, batch.group_ids, row_sample=batch.row_sample).unsqueeze(1)
    log_ratio = torch.where(mask, logprobs_theta - batch.behaviour_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    eps = settings.ppo_clip_eps
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps) * adv)
    loss, per_sample = _token_mean(surrogate, mask)
    n_tok = int(mask.sum().item())
    n_act = max(int(batch.action_mask.sum().item()), 1)
    with torch.no_grad():
        clipped = mask & ((ratio < 1.0 - eps) | (ratio > 1.0 + eps))
    stats = LossStats(
        loss=float(loss.item()),
        mean_ratio=float(ratio.detach()[mask].mean().item()) if n_tok else 1.0,
        clip_fraction=float(clipped.sum().item()) / max(n_tok, 1),
        masked_fraction=1.0 - n_tok / n_act,
        masked_error_fraction=1.0 - n_tok / n_act,
        tokens=float(n_tok),
    )
    return LossTerms(loss=loss, per_sample=per_sample, stats=stats)


def grpo_loss(
    logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings
) -> tuple[torch.Tensor, LossStats]:
    """Token-level GRPO loss averaged over action tokens, and its statistics."""
    terms = grpo_terms(logprobs_theta, batch, settings)
    return terms.loss, terms.stats


def sft_terms(logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings) -> LossTerms:
    """Mean negative log-likelihood over action tokens; only of samples with reward > 0 when
    ``sft_success_only`` (failed expert attempts are not imitated)."""
    mask = token_keep_mask(batch, settings)
    if settings.sft_success_only:
        mask = mask & (batch.rewards > 0).unsqueeze(1)
    loss, per_sample = _token_mean(-logprobs_theta, mask)
    n_tok = int(mask.sum().item())
    stats = LossStats(
        loss=float(loss.item()),
        masked_fraction=1.0 - n_tok / max(int(batch.action_mask.sum().item()), 1),
        tokens=float(n_tok),
    )
    return LossTerms(loss=loss, per_sample=per_sample, stats=stats)


def sft_loss(
    logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings
) -> tuple[torch.Tensor, LossStats]:
    """SFT loss (mean NLL over kept action tokens) and its statistics."""
    terms = sft_terms(logprobs_theta, batch, settings)
    return terms.loss, terms.stats
