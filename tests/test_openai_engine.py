"""The openai engine against `rollstream serve`'s server over real HTTP (torch engine behind it):
exact tokens and log-probabilities, the version that generated them, sticky routing over several
servers, fail-over, and weight reloads stamped only once the servers confirm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from agent_harness.batcher import Batcher
from agent_harness.engine import GenRequest, InferenceEngine
from agent_harness.openai_engine import OpenAIEngine, OpenAIEngineError
from agent_harness.server import PolicyServer, ServeSettings
from agent_harness.torch_engine import TorchEngine
from ops.config import ConfigError, load_config

SETTINGS = ServeSettings(port=0)


class Servers:
    """Several PolicyServers on free ports, each over its own torch engine (seeded)."""

    def __init__(self, weights_root: Path) -> None:
        self.weights_root = weights_root
        self.servers: list[PolicyServer] = []
        self.urls: list[str] = []

    async def add(self, policy: Path) -> PolicyServer:
        engine = Batcher(TorchEngine(policy, seed=len(self.servers)), max_batch=8, max_wait_s=0.002)
        server = PolicyServer(engine, SETTINGS, weights_root=self.weights_root)
        self.urls.append(await server.start())
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for s in self.servers:
            await s.stop()


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    group = Servers(tmp_path / "weights")
    yield group
    await group.close()


def _engine(urls: list[str], policy: Path, weights: Path, **kw: Any) -> OpenAIEngine:
    return OpenAIEngine(urls, policy, weights_dir=weights, connect_wait_s=3, **kw)


async def test_greedy_tokens_and_logprobs_over_http_equal_the_in_process_engine(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    await servers.add(tiny_policy)
    engine = _engine(servers.urls, tiny_policy, tmp_path / "weights")
    assert isinstance(engine, InferenceEngine)
    local = TorchEngine(tiny_policy, seed=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    requests = [GenRequest(p, 12, temperature=0.0, session=f"s{i}") for i, p in enumerate(prompts)]
    remote = await engine.generate(requests)
    expected = await local.generate(requests)
    for r, e in zip(remote, expected, strict=True):
        assert r.tokens == e.tokens
        assert r.logprobs == pytest.approx(e.logprobs, abs=1e-5)
        assert r.finish_reason == e.finish_reason and r.version == 0
    await engine.aclose()


async def test_sampled_generation_stops_at_a_stop_token_with_one_logprob_per_token(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    await servers.add(tiny_policy)
    engine = _engine(servers.urls, tiny_policy, tmp_path / "weights")
    stop = list(range(0, 400, 2))  # half the vocabulary stops: a stop comes within a few tokens
    gens = await engine.generate([GenRequest([5, 6], 40, 1.0, stop, session=f"e{i}") for i in range(6)])
    for g in gens:
        assert len(g.tokens) == len(g.logprobs) >= 1
        assert all(lp <= 0 for lp in g.logprobs)
        assert g.finish_reason == "stop" and g.tokens[-1] in stop
    await engine.aclose()


async def test_an_episode_sticks_to_one_server_and_sessions_spread_over_all(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    for _ in range(2):
        await servers.add(tiny_policy)
    engine = _engine(servers.urls, tiny_policy, tmp_path / "weights")
    sessions = [f"run:task-{i}:0" for i in range(12)]
    placed: dict[str, set[int]] = {s: set() for s in sessions}
    for _turn in range(3):
        before = [s.completions for s in servers.servers]
        for s in sessions:
            await engine.generate([GenRequest([5, 6, 7], 2, session=s)])
            after = [srv.completions for srv in servers.servers]
            placed[s] |= {k for k in range(2) if after[k] > before[k]}
            before = after
    assert all(len(where) == 1 for where in placed.values())
    assert {next(iter(w)) for w in placed.values()} == {0, 1}
    await engine.aclose()


async def test_an_unreachable_server_is_skipped_and_its_sessions_move(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    await servers.add(tiny_policy)
    engine = _engine(["http://127.0.0.1:9/v1", *servers.urls], tiny_policy, tmp_path / "weights")
    gens = await engine.generate([GenRequest([5, 6], 3, session=f"x{i}") for i in range(8)])
    assert len(gens) == 8 and servers.servers[0].completions >= 1
    dead = _engine(["http://127.0.0.1:9/v1"], tiny_policy, tmp_path / "weights", down_s=0.1)
    dead.connect_wait_s = 1.0
    with pytest.raises(OpenAIEngineError, match="no server answered"):
        await dead.generate([GenRequest([5], 1)])
    await engine.aclose()
    await dead.aclose()


async def test_new_weights_reach_every_server_before_the_version_moves(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    for _ in range(2):
        await servers.add(tiny_policy)
    engine = _engine(servers.urls, tiny_policy, servers.weights_root)
    trained = TorchEngine(tiny_policy, seed=0)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.05)
    await engine.load_weights(trained.export_weights(), 3)
    assert engine.version == 3
    assert all(s.engine.version == 3 and s.reloads == 1 for s in servers.servers)
    assert (servers.weights_root / "v000003" / "model.safetensors").exists()
    request = GenRequest([5, 6, 7], 8, temperature=0.0, session="a")
    [remote] = await engine.generate([request])
    [local] = await trained.generate([request])
    assert remote.version == 3 and remote.tokens == local.tokens
    await engine.load_weights(trained.export_weights(), 3)  # another worker asks again: no reload
    assert all(s.reloads == 1 for s in servers.servers)
    await engine.aclose()


async def test_a_refused_reload_leaves_the_version_and_a_restarted_server_lowers_it(
    servers: Servers, tiny_policy: Path, tmp_path: Path
) -> None:
    await servers.add(tiny_policy)
    outside = tmp_path / "elsewhere"
    engine = _engine(servers.urls, tiny_policy, outside)  # not under the server's weights root
    data = TorchEngine(tiny_policy, seed=0).export_weights()
    with pytest.raises(OpenAIEngineError, match="weights root"):
        await engine.load_weights(data, 2)
    assert engine.version == 0 and servers.servers[0].engine.version == 0
    good = _engine(servers.urls, tiny_policy, servers.weights_root)
    await good.load_weights(data, 2)
    assert good.version == 2
    await servers.servers[0].stop()  # the server restarts, on its port, from the base policy (v0)
    port = int(servers.urls[0].rsplit(":", 1)[1].split("/")[0])
    restarted = PolicyServer(TorchEngine(tiny_policy), SETTINGS, weights_root=servers.weights_root)
    await restarted.start(port)
    servers.servers.append(restarted)
    [gen] = await good.generate([GenRequest([5], 2, session="a")])
    assert gen.version == 0 and good.version == 0  # so the weight sync loads the newest again
    await engine.aclose()
    await good.aclose()


async def test_the_server_refuses_what_it_cannot_serve(servers: Servers, tiny_policy: Path) -> None:
    await servers.add(tiny_policy)
    async with httpx.AsyncClient(base_url=servers.urls[0]) as http:
        bad = await http.post("/completions", json={"prompt": [], "max_tokens": 2})
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]
        streamed = await http.post("/completions", json={"prompt": "hi", "stream": True})
        assert streamed.status_code == 400
        text = await http.post("/completions", json={"prompt": "hello", "max_tokens": 3, "logprobs": 1})
        body = text.json()
        assert body["policy_version"] == 0 and len(body["choices"][0]["logprobs"]["token_logprobs"]) <= 3
        models = await http.get("/models")
        assert models.json()["data"][0]["id"] == SETTINGS.model


async def test_a_seeded_completion_is_the_same_again_and_each_prompt_draws_its_own(
    servers: Servers, tiny_policy: Path
) -> None:
    await servers.add(tiny_policy)
    prompts = [list(range(20, 40)), list(range(20, 40)), list(range(50, 60))]

    async def tokens(http: httpx.AsyncClient, seed: Any, prompt: Any = prompts) -> list[list[int]]:
        resp = await http.post(
            "/completions", json={"prompt": prompt, "max_tokens": 10, "seed": seed, "ignore_eos": True}
        )
        assert resp.status_code == 200, resp.text
        return [c["token_ids"] for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]

    async with httpx.AsyncClient(base_url=servers.urls[0]) as http:
        first = await tokens(http, 7)
        assert await tokens(http, 7) == first
        assert first[0] != first[1]  # the same prompt twice in one call: two draws
        assert await tokens(http, 8) != first
        bad = await http.post("/completions", json={"prompt": prompts[0], "seed": "7"})
        assert bad.status_code == 400 and "seed" in bad.json()["error"]["message"]


def test_engine_openai_without_servers_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="openai_urls"):
        load_config(None, ['rollout.engine="openai"'])
    cfg = load_config(None, ['rollout.engine="openai"', "processes.serve=2", "serve.port=9100"])
    assert cfg.rollout_settings.openai_urls == ["http://127.0.0.1:9100/v1", "http://127.0.0.1:9101/v1"]
    assert cfg.rollout_settings.weights_dir == str(cfg.state / "weights" / cfg.run)
