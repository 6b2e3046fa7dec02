"""LoRA: the learner trains and publishes adapters only; engines (in process and behind
`rollstream serve`) merge them into the base policy exactly as peft does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch

from agent_harness.engine import GenRequest
from agent_harness.lora import SCALE_KEY, AdapterEngine, is_adapter
from agent_harness.model import PolicySettings
from agent_harness.openai_engine import OpenAIEngine
from agent_harness.server import PolicyServer, ServeSettings
from agent_harness.settings import LoraSettings
from agent_harness.torch_engine import TorchEngine
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from ops.config import ConfigError, load_config, to_toml
from tests.factories import chunk, sample

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def _trained(tiny_policy: Path) -> Trainer:
    """A LoRA trainer whose adapters are non-zero (peft starts B at 0, a no-op)."""
    trainer = Trainer(tiny_policy, LearnerSettings(), PolicySettings(lora=LORA))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return trainer


def test_only_adapter_tensors_travel_and_they_are_much_smaller(tiny_policy: Path) -> None:
    trainer = _trained(tiny_policy)
    data = trainer.weights_bytes()
    assert is_adapter(data)
    keys = set(safetensors.torch.load(data))
    assert SCALE_KEY in keys and all("lora_" in k for k in keys - {SCALE_KEY})
    full = Trainer(tiny_policy, LearnerSettings()).weights_bytes()
    assert not is_adapter(full) and len(data) < len(full) / 4
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


async def test_the_engine_merges_an_adapter_exactly_as_peft_does(tiny_policy: Path) -> None:
    trainer = _trained(tiny_policy)
    reference = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    engine = AdapterEngine(TorchEngine(tiny_policy, seed=0), tiny_policy)
    await engine.load_weights(trainer.weights_bytes(), 5)
    assert engine.version == 5
    got = engine.inner.model.state_dict()  # type: ignore[attr-defined]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], TorchEngine(tiny_policy).model.state_dict()[q])
    for name, tensor in reference.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


async def test_an_adapter_checkpoint_resumes_on_the_base_policy(tiny_policy: Path, tmp_path: Path) -> None:
    trainer = _trained(tiny_policy)
    trainer.checkpoint(tmp_path / "ckpt")
    again = Trainer.resume(tmp_path / "ckpt", tiny_policy, LearnerSettings(), PolicySettings(lora=LORA))
    resumed = safetensors.torch.load(again.weights_bytes())
    original = safetensors.torch.load(trainer.weights_bytes())
    assert resumed.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(resumed[name], tensor), name


async def test_rollstream_serve_loads_an_adapter_from_the_shared_disk(
    tiny_policy: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    server = PolicyServer(
        AdapterEngine(TorchEngine(tiny_policy), tiny_policy), ServeSettings(port=0), weights_root=weights
    )
    url = await server.start()
    try:
        engine = OpenAIEngine([url], tiny_policy, weights_dir=weights, connect_wait_s=3)
        trainer = _trained(tiny_policy)
        await engine.load_weights(trainer.weights_bytes(), 2)
        assert (weights / "v000002" / "adapter_model.safetensors").exists()
        assert not (weights / "v000002" / "model.safetensors").exists()
        local = AdapterEngine(TorchEngine(tiny_policy), tiny_policy)
        await local.load_weights(trainer.weights_bytes(), 2)
        request = GenRequest([5, 6, 7], 10, temperature=0.0, session="a")
        [remote] = await engine.generate([request])
        [mine] = await local.generate([request])
        assert remote.version == 2 and remote.tokens == mine.tokens
        assert remote.logprobs == pytest.approx(mine.logprobs, abs=1e-5)
        await engine.aclose()
    finally:
        await server.stop()


def test_lora_with_the_full_weight_warm_start_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="warm_start_steps"):
        load_config(None, ["policy.lora={r = 4}"])
    cfg = load_config(None, ["policy.lora={r = 4}", "learner.warm_start_steps=0"])
    assert cfg.policy.lora is not None and cfg.policy.lora.scale == 4.0


def test_an_sft_step_moves_the_adapters_and_leaves_the_base_frozen(tiny_policy: Path) -> None:
    trainer = Trainer(tiny_policy, LearnerSettings(lr=1e-2), PolicySettings(lora=LORA))
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before = trainer.weights_bytes()
    s = sample(
        [1, 2, 3], [chunk([10, 11, 12], [-1.0, -1.0, -1.0], [40, 41]), chunk([13, 14], [-1.0, -1.0])], 1.0
    )
    result = trainer.train_step([s], loss="sft")
    assert not result.skipped and trainer.step == 1
    assert trainer.weights_bytes() != before
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)


def test_the_configuration_round_trips_through_toml_with_and_without_lora(tmp_path: Path) -> None:
    for sets in ([], ["policy.lora={r = 4, alpha = 8}", "learner.warm_start_steps=0"]):
        cfg = load_config(None, sets)
        path = tmp_path / "config.toml"
        path.write_text(to_toml(cfg))
        assert load_config(path) == cfg
