"""IPA: chunk-level credit assignment with chunk importance ratios (pure tensor functions).

Chunk ``k`` of a sample owns the target action tokens with ``chunk_id == k``. Per chunk:

- return ``G_k = Σ_{j≥k} γ^{j−k} r_j``;
- ratio ``ρ_k = exp(mean_{t∈c_k}(log π_θ(y_t) − log π_b(y_t)))``, a geometric mean of token ratios;
- ``log π_θ(c_k)`` is the *mean* token log-probability of the chunk ("averaged over its tokens").

Loss (``ipa_surrogate="weighted"``): ``ℓ_k = −G_k · log π_θ(c_k)`` when the sample's reward is
positive, ``ℓ_k = −sg(clip(ρ_k, 0, 1)) · G_k · log π_θ(c_k)`` otherwise. With ``group_baseline``
the reward is replaced by its group-normalised advantage ``A`` before returns (terminal form,
``G_k = γ^{K−k} A``; per-chunk rewards are then not used) and the branch follows the sign of ``A``.
``ipa_failure_is=False`` (an ablation) drops the ratio from the failure branch.
``ipa_surrogate="ppo_clip"`` uses ``ℓ_k = −min(ρ_k G_k, clip(ρ_k, 1−ε, 1+ε) G_k)`` for every sample.

Masking removes a chunk from the loss: mismatch (``ρ_k`` outside ``[low, high]`` or the mean
probability gap ``|π_θ − π_b|`` over its tokens above the bound; judged on detached values) and
errors (tool status ``error``/``parse_error`` when ``mask_errors``).

Averaging: the loss is the mean of ``ℓ_k`` over the unmasked chunks of the whole batch, so every
kept chunk weighs the same whatever its length or sample. A batch with no kept chunk has loss 0
(still attached to the graph, so ``backward`` works and yields zero gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from learner.batch import Batch
    from learner.settings import LearnerSettings

GROUP_EPS = 1e-6
"""The ``eps`` in ``(R − mean) / (std + eps)`` of group normalisation."""


@dataclass(frozen=True, slots=True)
class LossStats:
    """Statistics of one loss evaluation: a micro-batch, or a whole step once ``merge``d."""

    loss: float
    tokens: float  # action tokens that carried loss (adds up over micro-batches)
    chunks: float = 0.0  # chunks that carried loss, IPA only (adds up)
    mean_ratio: float = 1.0
    masked_fraction: float = 0.0
    masked_mismatch_fraction: float = 0.0
    masked_error_fraction: float = 0.0
    mean_return: float = 0.0
    clip_fraction: float = 0.0  # token-level GRPO only

    @staticmethod
    def merge(parts: Sequence[LossStats]) -> LossStats:
        """Counts add up over micro-batches; every other statistic is averaged."""
        n = len(parts)
        mean = {f: sum(getattr(p, f) for p in parts) / n for f in LossStats.__slots__}
        counts = {"tokens": sum(p.tokens for p in parts), "chunks": sum(p.chunks for p in parts)}
        return LossStats(**(mean | counts))


@dataclass(frozen=True, slots=True)
class LossTerms:
    """A scalar loss with its per-sample contributions (detached) and its statistics."""

    loss: torch.Tensor
    per_sample: torch.Tensor  # [B], detached; 0 for a sample with nothing trained
    stats: LossStats


def chunk_returns(rewards_per_chunk: torch.Tensor | Sequence[float], gamma: float) -> torch.Tensor:
    """Discounted returns over the last dimension: ``G_k = r_k + γ G_{k+1}``.

    Trailing zero rewards (padding chunks) leave the returns of the real chunks unchanged.
    """
    r = torch.as_tensor(rewards_per_chunk, dtype=torch.float32)
    out = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0]) if r.shape[-1] else torch.zeros(r.shape[:-1])
    for k in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., k] + gamma * acc
        out[..., k] = acc
    return out


def token_logprobs(model_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probabilities of ``input_ids[:, t]`` under the logits at ``t − 1``; 0 at ``t = 0``."""
    logp = F.log_softmax(model_logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def chunk_onehot(chunk_id: torch.Tensor, num_chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, K]`` membership of each position in each chunk (all zero where ``chunk_id = −1``)."""
    return (chunk_id.unsqueeze(-1) == torch.arange(num_chunks, device=chunk_id.device)).to(dtype)


def chunk_mean(values: torch.Tensor, chunk_id: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``[B, K]`` mean of ``values`` over each chunk's tokens (0 for an empty chunk); differentiable."""
    onehot = chunk_onehot(chunk_id, num_chunks, values.dtype)
    sums = torch.einsum("bt,btk->bk", values, onehot)
    return sums / onehot.sum(dim=1).clamp(min=1.0)


def chunk_log_ratios(
    logprobs_theta: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    chunk_id: torch.Tensor,
    num_chunks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk the mean token log-ratio ``log π_θ − log π_b`` and ``ρ_k = exp`` of it, ``[B, K]`` each."""
    diff = torch.where(chunk_id >= 0, logprobs_theta - behaviour_logprobs, 0.0)
    mean_log_ratio = chunk_mean(diff, chunk_id, num_chunks)
    return mean_log_ratio, torch.exp(mean_log_ratio)


def group_normalise(
    rewards: torch.Tensor,
    group_ids: Sequence[str],
    eps: float = GROUP_EPS,
    row_sample: Sequence[int] | None = None,
) -> torch.Tensor:
    """``(R − group mean) / (group std + eps)`` per ``group_id`` (population std; a lone sample gets 0).
    With ``row_sample`` (the sample of each row), the rows of one sample's segments count once."""
    keys = list(row_sample) if row_sample is not None else list(range(len(group_ids)))
    out = torch.zeros_like(rewards)
    for gid in dict.fromkeys(group_ids):
        rows = [i for i, g in enumerate(group_ids) if g == gid]
        idx = torch.tensor(rows, dtype=torch.long)
        r = rewards[torch.tensor(list({keys[i]: i for i in rows}.values()), dtype=torch.long)]
        out[idx] = (rewards[idx] - r.mean()) / (r.std(unbiased=False) + eps)
    return out


def token_keep_mask(batch: Batch, settings: LearnerSettings) -> torch.Tensor:
    """``[B, T]`` action tokens left after error masking (used by the token-level losses)."""
    if not settings.mask_errors:
        return batch.action_mask
    valid = batch.chunk_valid.gather(1, batch.chunk_id.clamp(min=0))
    return batch.action_mask & valid


def _returns_and_sign(batch: Batch, settings: LearnerSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk returns ``[B, K]`` and whether each sample takes the positive branch ``[B]``."""
    if settings.group_baseline:
        adv = group_normalise(batch.rewards, batch.group_ids, row_sample=batch.row_sample)
        return batch.chunk_discount * adv.unsqueeze(1), adv > 0
    return batch.chunk_returns, batch.rewards > 0


def ipa_terms(logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings) -> LossTerms:
    """The IPA loss of the module docstring, with per-sample losses and statistics."""
    k = batch.num_chunks
    mean_lp = chunk_mean(torch.where(batch.action_mask, logprobs_theta, 0.0), batch.chunk_id, k)
    mean_log_ratio, rho = chunk_log_ratios(logprobs_theta, batch.behaviour_logprobs, batch.chunk_id, k)
    present = batch.chunk_present
    with torch.no_grad():
        rho_d = rho.detach()
        gap_tok = torch.where(
            batch.action_mask, (logprobs_theta.exp() - batch.behaviour_logprobs.exp()).abs(), 0.0
        )
        gap = chunk_mean(gap_tok, batch.chunk_id, k)
        mismatch = present & (
            (rho_d < settings.mismatch_ratio_low)
            | (rho_d > settings.mismatch_ratio_high)
            | (gap > settings.mismatch_max_prob_gap)
            | ~torch.isfinite(rho_d)
        )
        error = present & ~batch.chunk_valid if settings.mask_errors else torch.zeros_like(present)
        keep = present & ~mismatch & ~error

    returns, positive = _returns_and_sign(batch, settings)
    if settings.ipa_surrogate == "weighted":
        failed = rho_d.clamp(0.0, 1.0) if settings.ipa_failure_is else torch.ones_like(rho_d)
        weight = torch.where(positive.unsqueeze(1), torch.ones_like(rho_d), failed)
        chunk_loss = -weight * returns * mean_lp
    else:
        # exp of a masked chunk's (possibly huge) log-ratio would put inf·0 = NaN into the gradient.
        rho_g = torch.exp(torch.where(keep, mean_log_ratio, 0.0))
        eps = settings.ppo_clip_eps
        chunk_loss = -torch.minimum(rho_g * returns, rho_g.clamp(1.0 - eps, 1.0 + eps) * returns)
    chunk_loss = torch.where(keep, chunk_loss, 0.0)
    kept = int(keep.sum().item())
    loss = chunk_loss.sum() / max(kept, 1)

    n_present = max(int(present.sum().item()), 1)
    counts = chunk_onehot(batch.chunk_id, k, torch.float32).sum(dim=1)
    stats = LossStats(
        loss=float(loss.item()),
        mean_ratio=float(rho_d[present].mean().item()) if present.any() else 1.0,
        masked_fraction=float((present & ~keep).sum().item()) / n_present,
        masked_mismatch_fraction=float(mismatch.sum().item()) / n_present,
        masked_error_fraction=float(error.sum().item()) / n_present,
        chunks=float(kept),
        tokens=float(counts[keep].sum().item()),
        mean_return=float(returns[keep].mean().item()) if kept else 0.0,
    )
    per_sample = (chunk_loss.sum(dim=1) / keep.sum(dim=1).clamp(min=1)).detach()
    return LossTerms(loss=loss, per_sample=per_sample, stats=stats)


def ipa_loss(
    logprobs_theta: torch.Tensor, batch: Batch, settings: LearnerSettings
) -> tuple[torch.Tensor, LossStats]:
    """The IPA loss (mean over unmasked chunks) and its statistics; see the module docstring."""
    terms = ipa_terms(logprobs_theta, batch, settings)
    return terms.loss, terms.stats
