"""The trainer on a tiny real Qwen2 checkpoint: learning, weight bytes, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from learner.batch import build_batch
from learner.checkpoint import checkpoint_path, latest_checkpoint, read_state
from learner.ipa import token_logprobs
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from schemas.arrays import unpack_tokens
from schemas.trajectory import ScoredTrajectory
from tests.factories import chunk, sample, tiny_qwen2_config

SETTINGS = LearnerSettings(lr=1e-2, seed=0)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def base_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("base")
    Qwen2ForCausalLM(tiny_qwen2_config(tie_word_embeddings=request.param)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


def on_policy_sample(trainer: Trainer, reward: float = 1.0, *, group: str = "g") -> ScoredTrajectory:
    """A 2-chunk trajectory whose behaviour log-probs are the trainer's own (ρ = 1)."""
    draft = sample([1, 2, 3], [chunk([10, 11, 12], obs=[40, 41]), chunk([13, 14])], reward, group=group)
    b = build_batch([draft], pad_id=0, gamma=1.0, failure_reward=0.0)
    with torch.no_grad():
        lp = token_logprobs(trainer.model(input_ids=b.input_ids).logits, b.input_ids)[0]
    positions = b.action_mask[0].nonzero().flatten().tolist()
    first, second = [float(lp[t]) for t in positions[:3]], [float(lp[t]) for t in positions[3:]]
    return sample(
        [1, 2, 3], [chunk([10, 11, 12], first, [40, 41]), chunk([13, 14], second)], reward, group=group
    )


def action_loglik(trainer: Trainer, s: ScoredTrajectory) -> float:
    b = build_batch([s], pad_id=trainer.pad_id, gamma=1.0, failure_reward=0.0)
    with torch.no_grad():
        lp = token_logprobs(trainer.model(input_ids=b.input_ids).logits, b.input_ids)
    return float(lp[b.action_mask].sum())


def test_one_ipa_step_on_a_successful_trajectory_increases_its_log_likelihood(base_checkpoint: Path) -> None:
    trainer = Trainer(base_checkpoint, SETTINGS)
    s = on_policy_sample(trainer)
    before = action_loglik(trainer, s)
    result = trainer.train_step([s])
    assert not result.skipped and trainer.step == 1 and result.step == 1
    assert result.stats.mean_ratio == pytest.approx(1.0, abs=1e-5)
    assert result.grad_norm > 0 and len(result.per_sample_loss) == 1
    assert action_loglik(trainer, s) > before + 0.1


def test_grpo_and_sft_steps_run_with_micro_batches(base_checkpoint: Path) -> None:
    trainer = Trainer(base_checkpoint, msgspec.structs.replace(SETTINGS, grad_accum=2))
    samples = [on_policy_sample(trainer, r) for r in (1.0, 0.0, 1.0)]
    grpo = trainer.train_step(samples, loss="grpo")
    assert not grpo.skipped and grpo.stats.tokens == 15 and len(grpo.per_sample_loss) == 3
    sft = trainer.train_step(samples, loss="sft")
    assert not sft.skipped and sft.stats.tokens == 10 and trainer.step == 2


def test_a_batch_with_nothing_to_train_does_not_step(base_checkpoint: Path) -> None:
    trainer = Trainer(base_checkpoint, SETTINGS)
    before = trainer.weights_bytes()
    result = trainer.train_step([on_policy_sample(trainer, 0.0)], loss="sft")
    assert result.skipped and trainer.step == 0 and trainer.weights_bytes() == before


def test_weights_bytes_round_trip_reproduces_logits_exactly(base_checkpoint: Path) -> None:
    trainer = Trainer(base_checkpoint, SETTINGS)
    s = on_policy_sample(trainer)
    trainer.train_step([s])
    engine = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32).eval()
    result = engine.load_state_dict(safetensors.torch.load(trainer.weights_bytes()), strict=False)
    assert not result.unexpected_keys
    ids = torch.tensor([[1, 2, 3, *unpack_tokens(s.traj.chunks[0].action_tokens).tolist()]])
    with torch.no_grad():
        assert torch.equal(engine(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_save_and_resume_restore_version_step_weights_and_optimizer_state(
    base_checkpoint: Path, tmp_path: Path
) -> None:
    trainer = Trainer(base_checkpoint, SETTINGS)
    s = on_policy_sample(trainer)
    trainer.train_step([s])
    trainer.adopt_version(3)
    saved = trainer.checkpoint(tmp_path / "ckpt", extra={"stream_seq": 42})
    assert saved == checkpoint_path(tmp_path / "ckpt", 1)
    assert (saved / "tokenizer_config.json").is_file()
    assert read_state(saved).extra == {"stream_seq": 42}

    resumed = Trainer.resume(tmp_path / "ckpt", base_checkpoint, SETTINGS)
    assert (resumed.version, resumed.step, resumed.resumed_extra) == (3, 1, {"stream_seq": 42})
    assert resumed.weights_bytes() == trainer.weights_bytes()
    for a, b in zip(trainer.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The next step is the same from the original and the resumed trainer.
    trainer.train_step([s])
    resumed.train_step([s])
    assert resumed.weights_bytes() == trainer.weights_bytes()


def test_a_resumed_trainer_uses_the_configured_learning_rate_not_the_saved_one(
    base_checkpoint: Path, tmp_path: Path
) -> None:
    trainer = Trainer(base_checkpoint, msgspec.structs.replace(SETTINGS, lr=3e-3))
    trainer.train_step([on_policy_sample(trainer)])
    trainer.checkpoint(tmp_path / "ckpt")
    online = msgspec.structs.replace(SETTINGS, lr=2e-4, weight_decay=0.01)
    resumed = Trainer.resume(tmp_path / "ckpt", base_checkpoint, online)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [2e-4] * len(resumed.optimizer.param_groups)
    assert all(g["weight_decay"] == 0.01 for g in resumed.optimizer.param_groups)
    assert resumed.optimizer.state  # the moments themselves are kept


def test_resume_without_checkpoints_starts_from_the_base_at_version_zero(
    base_checkpoint: Path, tmp_path: Path
) -> None:
    (tmp_path / "ckpt" / ".step-00000005.tmp-abcd").mkdir(parents=True)  # an interrupted write
    (tmp_path / "ckpt" / "step-00000006").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path / "ckpt") is None
    trainer = Trainer.resume(tmp_path / "ckpt", base_checkpoint, SETTINGS)
    fresh = Trainer(base_checkpoint, SETTINGS)
    assert (trainer.version, trainer.step) == (0, 0)
    assert trainer.weights_bytes() == fresh.weights_bytes()


def test_latest_checkpoint_is_the_highest_step_and_overwriting_is_atomic(
    base_checkpoint: Path, tmp_path: Path
) -> None:
    trainer = Trainer(base_checkpoint, SETTINGS)
    root = tmp_path / "ckpt"
    trainer.save_checkpoint(checkpoint_path(root, 2), version=1, step=2, extra={})
    trainer.save_checkpoint(checkpoint_path(root, 10), version=5, step=10, extra={})
    trainer.save_checkpoint(checkpoint_path(root, 10), version=6, step=10, extra={})
    assert latest_checkpoint(root) == checkpoint_path(root, 10)
    assert read_state(checkpoint_path(root, 10)).version == 6
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000010"]
