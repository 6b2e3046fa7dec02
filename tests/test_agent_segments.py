"""A trajectory whose agent edited its history: segments laid out by the learner and the lake.

Pure layout and real torch loss maths; the proxy's side (a compaction starts a segment) is in
``tests/test_proxy.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.lake import LakeWriter, load_scored
from learner.batch import build_batch
from learner.ipa import group_normalise
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from schemas.arrays import pack_tokens
from schemas.trajectory import ScoredTrajectory
from tests.factories import chunk, sample


def _two_segments(reward: float, traj_id: str = "t", group: str = "g") -> ScoredTrajectory:
    first = [chunk([10, 11], [-0.1, -0.2], obs=[12, 13], index=0), chunk([14], [-0.3], index=1)]
    # the agent compacted: the next call saw [20, 21] + the last action only
    restart = chunk([22, 23, 24], [-0.4, -0.5, -0.6], index=2, context_tokens=pack_tokens([20, 21, 14]))
    return sample([1, 2, 3], [*first, restart], reward, traj_id=traj_id, group=group)


def test_each_segment_is_a_row_and_every_generated_token_is_trained_once_with_its_logprob() -> None:
    batch = build_batch([_two_segments(1.0)], pad_id=0, gamma=1.0, failure_reward=0.0)
    assert batch.size == 2 and batch.row_sample == [0, 0]
    assert batch.input_ids[0, :8].tolist() == [1, 2, 3, 10, 11, 12, 13, 14]
    assert batch.input_ids[1, :6].tolist() == [20, 21, 14, 22, 23, 24]
    targets = batch.input_ids[batch.action_mask].tolist()
    assert targets == [10, 11, 14, 22, 23, 24]  # the context's copy of 14 carries no loss
    assert (
        batch.behaviour_logprobs[batch.action_mask].tolist()
        == torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]).tolist()
    )
    assert batch.chunk_present.tolist() == [[True, True, False], [False, False, True]]
    assert (batch.chunk_present.sum(dim=0) == 1).all()  # each chunk in exactly one row


def test_a_group_baseline_counts_a_segmented_sample_once() -> None:
    samples = [_two_segments(1.0, "a"), sample([1], [chunk([5], index=0)], 0.0, traj_id="b")]
    batch = build_batch(samples, pad_id=0, gamma=1.0, failure_reward=0.0)
    assert batch.row_sample == [0, 0, 1]
    adv = group_normalise(batch.rewards, batch.group_ids, row_sample=batch.row_sample)
    # two samples (rewards 1 and 0): ±1, not the skewed values of three rows with rewards 1, 1, 0
    assert torch.allclose(adv, torch.tensor([1.0, 1.0, -1.0]), atol=1e-4)


def test_segments_survive_the_lake(tmp_path: Path) -> None:
    scored = _two_segments(1.0)
    writer = LakeWriter(tmp_path / "lake", writer_id="t")
    writer.add_scored(scored)
    writer.flush()
    [back] = load_scored(tmp_path / "lake", "SELECT traj_id FROM trajectories")
    assert [c.context_tokens for c in back.traj.chunks] == [c.context_tokens for c in scored.traj.chunks]


@pytest.mark.parametrize("loss", ["ipa", "grpo"])
def test_a_trainer_step_trains_each_token_of_a_segmented_sample_once_and_reports_per_sample(
    tiny_policy: Path, loss: str
) -> None:
    trainer = Trainer(tiny_policy, LearnerSettings(lr=1e-2, seed=0, grad_accum=2))
    plain = sample([1, 2], [chunk([7, 8], index=0)], 0.0, traj_id="p")
    result = trainer.train_step([_two_segments(1.0), plain], loss=loss)  # type: ignore[arg-type]
    assert not result.skipped and len(result.per_sample_loss) == 2
    assert result.stats.tokens == 6 + 2  # 3 rows over 2 micro-batches, every action token once
