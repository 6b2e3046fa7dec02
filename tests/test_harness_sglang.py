"""SGLangEngine against a local HTTP server that answers with sglang's documented shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from aiohttp import web

from agent_harness.engine import GenRequest, InferenceEngine
from agent_harness.sglang_engine import SGLangEngine, SGLangError


def _answer(input_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
    n = params["max_new_tokens"]
    out = [(sum(input_ids) + k) % 50 + 10 for k in range(n)]
    stops = params.get("stop_token_ids", [])
    if stops and n > 2:  # pretend the model emitted a stop token as its third token
        out = [*out[:2], stops[0]]
    finish = {"type": "stop", "matched": stops[0]} if stops and n > 2 else {"type": "length", "length": n}
    return {
        "text": "ignored",
        "output_ids": out,
        "meta_info": {
            "id": "abc",
            "finish_reason": finish,
            "prompt_tokens": len(input_ids),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "output_token_logprobs": [[-0.25 * (k + 1), t, None] for k, t in enumerate(out)],
        },
    }


@pytest.fixture
async def sglang_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        ids, params = body["input_ids"], body["sampling_params"]
        if ids and isinstance(ids[0], list):
            return web.json_response([_answer(i, p) for i, p in zip(ids, params, strict=True)])
        return web.json_response(_answer(ids, params))

    async def update(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        ok = (Path(body["model_path"]) / "model.safetensors").exists()
        msg = "Succeeded to update model weights." if ok else "Failed to get weights iterator"
        return web.json_response({"success": ok, "message": msg}, status=200 if ok else 400)

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/update_weights_from_disk", update)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_generate_sends_token_ids_and_reads_logprobs(
    sglang_server: tuple[str, list[dict[str, Any]]],
    tiny_policy: Path,
) -> None:
    url, seen = sglang_server
    engine = SGLangEngine(url, tiny_policy)
    assert isinstance(engine, InferenceEngine)
    [one] = await engine.generate([GenRequest([1, 2, 3], 2, temperature=0.5)])
    assert one.tokens == [16, 17] and one.logprobs == [-0.25, -0.5] and one.finish_reason == "length"
    assert seen[-1] == {
        "input_ids": [1, 2, 3],
        "sampling_params": {
            "max_new_tokens": 2,
            "temperature": 0.5,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        },
        "return_logprob": True,
    }
    batch = await engine.generate([GenRequest([1], 5, stop_token_ids=[4]), GenRequest([2, 2], 1)])
    assert batch[0].tokens[-1] == 4 and batch[0].finish_reason == "stop" and len(batch[0].logprobs) == 3
    assert batch[1].finish_reason == "length" and len(batch[1].tokens) == 1
    assert seen[-1]["input_ids"] == [[1], [2, 2]] and seen[-1]["sampling_params"][0]["stop_token_ids"] == [4]
    await engine.aclose()


async def test_load_weights_writes_a_checkpoint_and_updates_from_disk(
    sglang_server: tuple[str, list[dict[str, Any]]],
    tiny_policy: Path,
    tmp_path: Path,
) -> None:
    url, seen = sglang_server
    engine = SGLangEngine(url, tiny_policy, weights_dir=tmp_path / "w")
    data = safetensors.torch.save({"w": torch.ones(2)})
    await engine.load_weights(data, version=7)
    assert engine.version == 7
    path = Path(seen[-1]["model_path"])
    assert (path / "model.safetensors").read_bytes() == data and (path / "config.json").exists()
    with pytest.raises(SGLangError):
        await engine.update_weights_from_disk(tmp_path / "nowhere", version=8)
    assert engine.version == 7
    await engine.aclose()


async def test_an_unreachable_server_is_an_sglang_error(tiny_policy: Path) -> None:
    engine = SGLangEngine("http://127.0.0.1:9", tiny_policy, timeout_s=2)
    with pytest.raises(SGLangError):
        await engine.generate([GenRequest([1], 1)])
    await engine.aclose()
