"""IPA, GRPO and SFT maths, batch layout and the staleness gate, on hand-computable examples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import pytest
import torch

from learner.batch import Batch, BatchError, build_batch
from learner.grpo import grpo_loss, sft_loss
from learner.ipa import GROUP_EPS, chunk_log_ratios, chunk_returns, ipa_loss, token_logprobs
from learner.settings import LearnerSettings
from learner.staleness import admit, staleness
from schemas.trajectory import ScoredTrajectory
from tests.factories import chunk, sample


def batch_of(*samples: ScoredTrajectory, gamma: float = 1.0, failure_reward: float = 0.0) -> Batch:
    return build_batch(samples, pad_id=0, gamma=gamma, failure_reward=failure_reward)


def theta_logprobs(batch: Batch, values: dict[tuple[int, int], float]) -> torch.Tensor:
    """A leaf ``[B, T]`` tensor of π_θ log-probs: the behaviour ones, overridden at (row, position)."""
    lp = batch.behaviour_logprobs.clone()
    for (i, t), v in values.items():
        lp[i, t] = v
    return lp.requires_grad_(True)


SETTINGS = LearnerSettings()

# -- returns -------------------------------------------------------------------------------------


def test_chunk_returns_with_terminal_reward_match_hand_values() -> None:
    assert chunk_returns([0.0, 0.0, 1.0], 0.9).tolist() == pytest.approx([0.81, 0.9, 1.0])
    s = sample([1], [chunk([2]), chunk([3]), chunk([4])], reward=1.0)
    assert batch_of(s, gamma=0.9).chunk_returns[0].tolist() == pytest.approx([0.81, 0.9, 1.0])


def test_chunk_returns_with_per_chunk_rewards_discount_later_rewards() -> None:
    # G3 = 2, G2 = 0 + 0.5·2 = 1, G1 = 1 + 0.5·1 = 1.5
    assert chunk_returns([1.0, 0.0, 2.0], 0.5).tolist() == pytest.approx([1.5, 1.0, 2.0])
    s = sample([1], [chunk([2]), chunk([3]), chunk([4])], reward=3.0, chunk_rewards=[1.0, 0.0, 2.0])
    assert batch_of(s, gamma=0.5).chunk_returns[0].tolist() == pytest.approx([1.5, 1.0, 2.0])


def test_padding_chunks_leave_returns_of_a_shorter_trajectory_unchanged() -> None:
    long = sample([1], [chunk([2]), chunk([3]), chunk([4])], reward=1.0)
    short = sample([1], [chunk([2])], reward=1.0)
    b = batch_of(long, short, gamma=0.9)
    assert b.chunk_returns[1].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert b.chunk_present[1].tolist() == [True, False, False]


def test_failure_reward_is_added_to_failed_samples_only() -> None:
    ok = sample([1], [chunk([2]), chunk([3])], reward=1.0)
    failed = sample([1], [chunk([2]), chunk([3])], reward=0.0)
    b = batch_of(ok, failed, gamma=0.5, failure_reward=-1.0)
    assert b.rewards.tolist() == [1.0, -1.0]
    assert b.chunk_returns[1].tolist() == pytest.approx([-0.5, -1.0])


def test_mismatched_chunk_rewards_are_rejected() -> None:
    s = sample([1], [chunk([2]), chunk([3])], reward=1.0, chunk_rewards=[1.0])
    with pytest.raises(BatchError, match="2 chunks"):
        batch_of(s)


# -- batch layout --------------------------------------------------------------------------------


def test_build_batch_aligns_action_tokens_and_logprobs_with_input_ids() -> None:
    s = sample(
        [10, 11, 12],
        [chunk([20, 21], [-0.1, -0.2], [30, 31]), chunk([22], [-0.3], [32], status="none")],
        reward=1.0,
    )
    short = sample([10], [chunk([23], [-0.4])], reward=0.0)
    b = batch_of(s, short)
    assert b.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 31, 22, 32]
    assert b.input_ids[1].tolist() == [10, 23, 0, 0, 0, 0, 0, 0, 0]
    assert b.attention_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert b.chunk_id[0].tolist() == [-1, -1, -1, 0, 0, -1, -1, 1, -1]
    assert b.chunk_id[1].tolist() == [-1, 0, -1, -1, -1, -1, -1, -1, -1]
    assert b.input_ids[0][b.action_mask[0]].tolist() == [20, 21, 22]
    assert b.behaviour_logprobs[0][b.action_mask[0]].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert b.behaviour_logprobs[1][b.action_mask[1]].tolist() == pytest.approx([-0.4])
    assert b.chunk_present.tolist() == [[True, True], [True, False]]
    assert b.group_ids == ["g", "g"]


def test_token_logprobs_of_position_t_come_from_logits_at_t_minus_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[3, 1, 6, 2]])
    lp = token_logprobs(logits, ids)
    expected = [0.0] + [torch.log_softmax(logits[0, t - 1], -1)[ids[0, t]].item() for t in range(1, 4)]
    assert lp[0].tolist() == pytest.approx(expected)


def test_action_token_at_position_zero_carries_no_loss() -> None:
    b = batch_of(sample([], [chunk([5, 6], [-1.0, -2.0])], reward=1.0))
    assert b.chunk_id[0].tolist() == [-1, 0]
    assert b.behaviour_logprobs[0].tolist() == [0.0, -2.0]


def test_arrays_of_different_lengths_are_rejected() -> None:
    with pytest.raises(BatchError, match="2 action tokens but 1"):
        batch_of(sample([1], [chunk([2, 3], [-1.0])], reward=1.0))


# -- chunk ratios and the IPA loss ---------------------------------------------------------------


def test_chunk_ratio_is_geometric_mean_of_token_ratios() -> None:
    s = sample([1], [chunk([2, 3], [-1.5, -1.5], [9]), chunk([4, 5, 6], [-1.0, -1.0, -1.0])], reward=1.0)
    b = batch_of(s)
    theta = [-1.0, -2.0, -0.5, -1.0, -3.0]
    lp = theta_logprobs(b, dict(zip([(0, 1), (0, 2), (0, 4), (0, 5), (0, 6)], theta, strict=True)))
    mean_log_ratio, rho = chunk_log_ratios(lp, b.behaviour_logprobs, b.chunk_id, b.num_chunks)
    assert mean_log_ratio[0].tolist() == pytest.approx([0.0, -0.5])
    geo0 = (math.exp(0.5) * math.exp(-0.5)) ** 0.5
    geo1 = (math.exp(0.5) * math.exp(0.0) * math.exp(-2.0)) ** (1 / 3)
    assert rho[0].tolist() == pytest.approx([geo0, geo1])


def two_chunk_success() -> tuple[Batch, torch.Tensor]:
    """prompt [1, 2], chunk 0 = tokens 3, 4 (+ obs 5), chunk 1 = token 6; R = 1, γ = 0.5 → G = [0.5, 1]."""
    s = sample([1, 2], [chunk([3, 4], [-1.0, -3.0], [5]), chunk([6], [-2.0])], reward=1.0)
    b = batch_of(s, gamma=0.5)
    return b, theta_logprobs(b, {})  # on-policy: π_θ = π_b, ρ = 1


def test_positive_reward_loss_is_minus_return_times_mean_chunk_logprob() -> None:
    b, lp = two_chunk_success()
    loss, stats = ipa_loss(lp, b, SETTINGS)
    # chunk 0: −0.5 · mean(−1, −3) = 1; chunk 1: −1 · (−2) = 2; mean over 2 chunks = 1.5
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert lp.grad is not None
    # ∂/∂lp_t = −G_k / (n_k · kept chunks)
    assert lp.grad[0].tolist() == pytest.approx([0, 0, -0.125, -0.125, 0, -0.5])
    assert stats.tokens == 3 and stats.chunks == 2 and stats.masked_fraction == 0


def failed_one_chunk(theta: Sequence[float], behaviour: Sequence[float]) -> tuple[Batch, torch.Tensor]:
    b = batch_of(sample([1], [chunk([2, 3], behaviour)], reward=-1.0))
    return b, theta_logprobs(b, {(0, 1): theta[0], (0, 2): theta[1]})


def test_negative_reward_weights_by_clipped_ratio_with_no_gradient_through_it() -> None:
    b, lp = failed_one_chunk([-1.0, -2.0], [-0.5, -1.5])  # mean log-ratio −0.5
    rho = math.exp(-0.5)
    loss, stats = ipa_loss(lp, b, SETTINGS)
    # −sg(ρ) · G · mean lp = −ρ · (−1) · (−1.5)
    assert loss.item() == pytest.approx(-1.5 * rho)
    assert stats.mean_ratio == pytest.approx(rho)
    loss.backward()
    assert lp.grad is not None
    # With ρ detached: ∂/∂lp_t = −ρ · G / n = ρ / 2. A gradient through ρ would add −1.5 · ρ / 2.
    assert lp.grad[0, 1:].tolist() == pytest.approx([rho / 2, rho / 2])


def test_the_ablation_without_failure_is_weights_a_failure_by_one() -> None:
    b, lp = failed_one_chunk([-1.0, -2.0], [-0.5, -1.5])  # ρ = e^−0.5 would scale the loss
    ablation = msgspec.structs.replace(SETTINGS, ipa_failure_is=False)
    loss, _ = ipa_loss(lp, b, ablation)
    assert loss.item() == pytest.approx(-1.5)  # −1 · G · mean lp, as if ρ were 1
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[0, 1:].tolist() == pytest.approx([0.5, 0.5])


def test_ratio_above_one_is_clipped_to_one_for_failed_samples() -> None:
    b, lp = failed_one_chunk([-1.0, -2.0], [-1.5, -2.5])  # mean log-ratio +0.5, ρ ≈ 1.65
    loss, _ = ipa_loss(lp, b, SETTINGS)
    assert loss.item() == pytest.approx(-1.5)
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[0, 1:].tolist() == pytest.approx([0.5, 0.5])


def test_failed_samples_without_failure_reward_or_baseline_carry_no_gradient() -> None:
    b = batch_of(sample([1], [chunk([2, 3])], reward=0.0))
    lp = theta_logprobs(b, {})
    loss, _ = ipa_loss(lp, b, SETTINGS)
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum().item() == 0.0


def test_group_baseline_gives_failed_samples_a_negative_advantage() -> None:
    ok = sample([1], [chunk([2], [-1.0])], reward=1.0, traj_id="a")
    failed = sample([1], [chunk([3], [-2.0])], reward=0.0, traj_id="b")
    b = batch_of(ok, failed)
    lp = theta_logprobs(b, {})
    loss, _ = ipa_loss(lp, b, msgspec.structs.replace(SETTINGS, group_baseline=True))
    a = 0.5 / (0.5 + GROUP_EPS)
    # success: −a · (−1); failure (ρ = 1): −1 · (−a) · (−2); mean over 2 chunks
    assert loss.item() == pytest.approx((a - 2 * a) / 2)
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[:, 1].tolist() == pytest.approx([-a / 2, a / 2])


def test_ppo_clip_surrogate_clips_the_chunk_ratio_for_a_positive_return() -> None:
    b = batch_of(sample([1], [chunk([2], [-1.0]), chunk([3], [-1.0])], reward=1.0))
    lp = theta_logprobs(b, {(0, 1): -0.5, (0, 2): -1.1})  # ρ = e^0.5 (clipped to 1.2), e^−0.1
    settings = msgspec.structs.replace(SETTINGS, ipa_surrogate="ppo_clip")
    loss, _ = ipa_loss(lp, b, settings)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2)
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[0, 1:].tolist() == pytest.approx([0.0, -math.exp(-0.1) / 2])


def test_mismatch_masking_masks_only_the_chunk_whose_ratio_is_out_of_bounds() -> None:
    s = sample([1], [chunk([2], [-1.0]), chunk([3], [-4.0])], reward=1.0)
    b = batch_of(s)
    lp = theta_logprobs(b, {(0, 2): -1.0})  # chunk 1: ρ = e^3 ≈ 20 > 10
    loss, stats = ipa_loss(lp, b, SETTINGS)
    assert loss.item() == pytest.approx(1.0)  # chunk 0 alone: −1 · (−1)
    assert stats.masked_mismatch_fraction == 0.5 and stats.masked_error_fraction == 0.0
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[0].tolist() == pytest.approx([0.0, -1.0, 0.0])


def test_mismatch_masking_masks_a_chunk_whose_probability_gap_is_too_large() -> None:
    s = sample([1], [chunk([2], [math.log(0.5)]), chunk([3], [math.log(0.5)])], reward=1.0)
    b = batch_of(s)
    lp = theta_logprobs(b, {(0, 2): math.log(0.9)})  # gap 0.4, ratio 1.8 (within ratio bounds)
    _, stats = ipa_loss(lp, b, msgspec.structs.replace(SETTINGS, mismatch_max_prob_gap=0.3))
    assert stats.masked_mismatch_fraction == 0.5 and stats.chunks == 1


def test_error_masking_masks_a_parse_error_chunk() -> None:
    s = sample([1], [chunk([2], [-1.0]), chunk([3], [-2.0], status="parse_error")], reward=1.0)
    b = batch_of(s)
    lp = theta_logprobs(b, {})
    loss, stats = ipa_loss(lp, b, SETTINGS)
    assert loss.item() == pytest.approx(1.0)
    assert stats.masked_error_fraction == 0.5 and stats.masked_mismatch_fraction == 0.0
    unmasked, stats_off = ipa_loss(lp, b, msgspec.structs.replace(SETTINGS, mask_errors=False))
    assert unmasked.item() == pytest.approx((1.0 + 2.0) / 2) and stats_off.masked_fraction == 0.0


# -- baselines -----------------------------------------------------------------------------------


def test_grpo_token_loss_matches_hand_computed_value_on_a_two_sample_group() -> None:
    ok = sample([1], [chunk([2, 3], [-1.0, -1.0])], reward=1.0, traj_id="a")
    failed = sample([1], [chunk([4], [-1.0])], reward=0.0, traj_id="b")
    b = batch_of(ok, failed)
    lp = theta_logprobs(
        b, {(0, 1): -1.0 + math.log(1.5), (0, 2): -1.0 + math.log(0.9), (1, 1): -1.0 + math.log(0.7)}
    )
    loss, stats = grpo_loss(lp, b, SETTINGS)
    a = 0.5 / (0.5 + GROUP_EPS)  # advantages +a, −a
    # tokens: −min(1.5a, 1.2a) = −1.2a; −min(0.9a, 0.9a) = −0.9a; −min(−0.7a, −0.8a) = 0.8a
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) * a / 3)
    assert stats.tokens == 3
    loss.backward()
    assert lp.grad is not None
    # clipped tokens have no gradient; the others −ratio · A / 3
    assert lp.grad[0, 1:3].tolist() == pytest.approx([0.0, -0.9 * a / 3])
    assert lp.grad[1, 1].item() == 0.0


def test_sft_loss_is_mean_nll_over_action_tokens_of_successful_samples() -> None:
    ok = sample([1], [chunk([2, 3], [-1.0, -3.0], [7])], reward=1.0)
    failed = sample([1], [chunk([4], [-5.0])], reward=0.0)
    b = batch_of(ok, failed)
    loss, stats = sft_loss(theta_logprobs(b, {}), b, SETTINGS)
    assert loss.item() == pytest.approx(2.0) and stats.tokens == 2
    loss_all, _ = sft_loss(
        theta_logprobs(b, {}), b, msgspec.structs.replace(SETTINGS, sft_success_only=False)
    )
    assert loss_all.item() == pytest.approx(3.0)


# -- staleness -----------------------------------------------------------------------------------


def test_staleness_is_learner_version_minus_the_oldest_chunk_version() -> None:
    s = sample([1], [chunk([2], version=4), chunk([3], version=3)], reward=1.0, min_version=3)
    assert staleness(5, s.traj) == 2
    assert staleness(5, sample([1], [], reward=0.0, min_version=1).traj) == 4


@pytest.mark.parametrize(
    ("eta", "learner_version", "admitted"),
    [(0, 3, True), (0, 4, False), (2, 5, True), (2, 6, False)],
)
def test_staleness_gate_admits_up_to_eta_and_drops_beyond(
    eta: int, learner_version: int, admitted: bool
) -> None:
    s = sample([1], [chunk([2], version=3), chunk([3], version=4)], reward=1.0, min_version=3)
    assert admit(learner_version, s.traj, eta) == (admitted, learner_version - 3)


def test_settings_reject_unknown_fields_and_inverted_ratio_bounds() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"max_stalness": 1}, LearnerSettings)
    with pytest.raises(msgspec.ValidationError, match="mismatch_ratio_low"):
        msgspec.convert({"mismatch_ratio_low": 5.0, "mismatch_ratio_high": 2.0}, LearnerSettings)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"failure_reward": 0.5}, LearnerSettings)
