"""The offline SFT warm start (real torch): it fits the demonstrations and is installed as the
learner's first checkpoint, at version 1, with a fresh optimiser at the online learning rate."""

from __future__ import annotations

from pathlib import Path

import torch

from learner.settings import LearnerSettings
from learner.trainer import Trainer
from learner.warmstart import WARM_VERSION, install, sft_steps
from tests.factories import make_policy, scored


def test_sft_warm_start_fits_demonstrations_and_is_resumed_at_version_one(tmp_path: Path) -> None:
    make_policy(tmp_path / "base")
    trainer = Trainer(tmp_path / "base", LearnerSettings(lr=1e-2, loss="sft"))
    demos = [scored(i, 0) for i in range(6)]
    losses = sft_steps(trainer, demos, steps=30, batch=4, seed=1)
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]  # the demonstrations' NLL falls

    path = install(trainer, tmp_path / "ckpt", lr=1e-4)
    resumed = Trainer.resume(tmp_path / "ckpt", tmp_path / "base", LearnerSettings(lr=1e-4))
    assert (resumed.version, resumed.step) == (WARM_VERSION, 0)
    assert resumed.resumed_extra == {"warm_start": True}
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [1e-4]
    assert not resumed.optimizer.state  # no SFT moments carried into RL
    for (name, a), b in zip(
        trainer.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert (path / "config.json").is_file()
