"""The proxy's OpenAI surface, driven by the official ``openai`` client over real HTTP: streaming with
tool-call deltas, ``n``, ``stop``, the legacy completions endpoint, usage, and OpenAI-shaped errors.

Engines: the files expert (deterministic tool calls), a scripted engine with fixed text, and the
tiny torch policy; the recordings are checked token for token.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from agent_harness.batcher import Batcher
from agent_harness.proxy import EXEC_TOKEN_HEADER, ModelProxy, ProxySettings
from agent_harness.proxy_session import Identity
from agent_harness.scripted import ScriptedEngine
from agent_harness.tools import ToolRegistry
from agent_harness.torch_engine import TorchEngine
from producers.families.files import FilesExpert
from schemas.arrays import unpack_tokens
from streams.bus import Publisher
from streams.topology import ensure

RUN = "po"
TASK = [{"role": "user", "content": "The file a.txt names a file. Write its content to answer.txt."}]


class _Fixed(ScriptedEngine):
    """Always says ``text`` (no special tokens, so its text decodes back to its tokens exactly)."""

    text = "alpha STOP beta"

    def next_action(self, context: str) -> str:
        return self.text


@pytest.fixture
async def publisher(js: JetStreamContext) -> Publisher:
    await ensure(js, RUN)
    return Publisher(js)


@contextlib.asynccontextmanager
async def _client(proxy: ModelProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    url = await proxy.start()
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        await client.close()
        await proxy.stop()


async def _streamed(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[dict[str, Any], str, Any]:
    """The assistant message assembled from a stream's deltas, its finish reason and its usage."""
    content, calls, finish, use = "", {}, "", None
    stream = await client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    async for event in stream:
        use = event.usage or use
        for choice in event.choices:
            finish = choice.finish_reason or finish
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(
                    d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                entry["id"] = d.id or entry["id"]
                if d.function is not None:
                    entry["function"]["name"] += d.function.name or ""
                    entry["function"]["arguments"] += d.function.arguments or ""
    return {"content": content or None, "tool_calls": list(calls.values())}, finish, use


async def test_a_streamed_reply_carries_the_same_tool_call_as_a_whole_one_and_usage(
    publisher: Publisher, tiny_policy: Path
) -> None:
    expert = FilesExpert(
        tokenizer=AutoTokenizer.from_pretrained(tiny_policy), error_rate=0.0, seed=0, version=4
    )
    proxy = ModelProxy(expert, publisher, RUN, ProxySettings(port=0))
    tools = ToolRegistry().schemas()
    async with _client(proxy) as client:
        whole = await client.chat.completions.create(model="m", messages=TASK, tools=tools, user="whole")
        streamed, finish, use = await _streamed(
            client, model="m", messages=TASK, tools=tools, user="streamed"
        )
    [call] = whole.choices[0].message.tool_calls or []
    [delta_call] = streamed["tool_calls"]
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert delta_call["function"] == {"name": call.function.name, "arguments": call.function.arguments}
    assert call.function.name == "bash" and "command" in json.loads(call.function.arguments)
    assert len(delta_call["id"]) == 9 and delta_call["id"].isalnum()  # Mistral's id shape, for every format
    assert use is not None and whole.usage is not None
    assert (
        use.prompt_tokens == whole.usage.prompt_tokens
        and use.completion_tokens == whole.usage.completion_tokens
    )


async def test_of_n_choices_only_the_one_the_client_continues_is_recorded(
    publisher: Publisher, tiny_policy: Path
) -> None:
    engine = Batcher(TorchEngine(tiny_policy, seed=5, version=1))
    proxy = ModelProxy(engine, publisher, RUN, ProxySettings(port=0))
    async with _client(proxy) as client:
        resp = await client.chat.completions.create(model="m", messages=TASK, n=3, max_tokens=6, user="n3")
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert resp.usage is not None and 3 <= resp.usage.completion_tokens <= 18  # over all choices
        assert len({c.message.content for c in resp.choices}) == 3
        chosen = resp.choices[2].message.model_dump(exclude_none=True)
        await client.chat.completions.create(
            model="m", messages=[*TASK, chosen, {"role": "user", "content": "go on"}], max_tokens=4, user="n3"
        )
        session = proxy.sessions["n3"]
        assert session.dropped_choices == 2 and session.segments == 1
        [traj_id] = await proxy.finish("n3", reward=None)
    assert traj_id == f"{RUN}:proxy:n3:0"


async def test_a_seeded_call_gives_the_same_choices_again_and_its_n_choices_differ(
    publisher: Publisher, tiny_policy: Path
) -> None:
    engine = Batcher(TorchEngine(tiny_policy, seed=6, version=1))
    proxy = ModelProxy(engine, publisher, RUN, ProxySettings(port=0))
    async with _client(proxy) as client:

        async def contents(seed: int | None, user: str) -> list[str | None]:
            resp = await client.chat.completions.create(
                model="m", messages=TASK, n=3, max_tokens=12, seed=seed, user=user
            )
            return [c.message.content for c in resp.choices]

        first = await contents(41, "a")
        results: dict[str, list[str | None]] = {}

        async def keep(user: str, seed: int | None) -> None:
            results[user] = await contents(seed, user)

        async with anyio.create_task_group() as tg:  # the same seed again, now beside other calls
            for user, seed in (("b", None), ("c", 41), ("d", 42)):
                tg.start_soon(keep, user, seed)
        assert results["c"] == first and len(set(first)) == 3
        assert results["d"] != first and results["b"] != first


async def test_stop_strings_cut_the_reply_and_the_recording_keeps_every_generated_token(
    publisher: Publisher, tiny_policy: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    proxy = ModelProxy(_Fixed(tokenizer=tok, version=2), publisher, RUN, ProxySettings(port=0))
    async with _client(proxy) as client:
        resp = await client.chat.completions.create(model="m", messages=TASK, stop=["STOP"], user="stop")
        assert resp.choices[0].message.content == "alpha"
        assert resp.choices[0].finish_reason == "stop"
        session = await proxy.take("stop")
    assert session is not None
    [chunk] = session.chunks
    assert tok.decode(unpack_tokens(chunk.action_tokens).tolist()) == "alpha STOP beta"


async def test_legacy_completions_continue_one_recording_when_the_prompt_extends_the_last_reply(
    publisher: Publisher, tiny_policy: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    proxy = ModelProxy(_Fixed(tokenizer=tok, version=2), publisher, RUN, ProxySettings(port=0))
    async with _client(proxy) as client:
        first = await client.completions.create(
            model="m", prompt="Once upon a time", max_tokens=16, user="legacy"
        )
        text = first.choices[0].text
        assert text == "alpha STOP beta" and first.object == "text_completion"
        pieces = [
            e.choices[0].text
            async for e in await client.completions.create(
                model="m", prompt=f"Once upon a time{text} and then", stream=True, user="legacy"
            )
            if e.choices
        ]
        assert "".join(pieces) == "alpha STOP beta"
        session = await proxy.take("legacy")
    assert session is not None and session.segments == 1 and len(session.chunks) == 2
    assert tok.decode(unpack_tokens(session.chunks[0].obs_tokens).tolist()) == " and then"


async def test_refused_requests_get_openai_errors_naming_the_parameter(
    publisher: Publisher, tiny_policy: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    proxy = ModelProxy(_Fixed(tokenizer=tok), publisher, RUN, ProxySettings(port=0))
    async with _client(proxy) as client:
        for kwargs, param in (
            ({"n": 9}, "n"),
            ({"top_p": 0.5}, "top_p"),
            ({"temperature": 3}, "temperature"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="m", messages=TASK, **kwargs)
            assert err.value.body["param"] == param  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="prompt must be"):
            await client.completions.create(model="m", prompt="")
        async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
            bad = await http.post("chat/completions", content=b"{not json")
            missing = await http.get("embeddings")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert missing.status_code == 404 and missing.json()["error"]["message"].startswith("no route")


async def test_the_exec_endpoint_needs_the_sessions_token_and_closes_with_the_episode(
    publisher: Publisher, tiny_policy: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    proxy = ModelProxy(_Fixed(tokenizer=tok), publisher, RUN, ProxySettings(port=0))
    ran: list[str] = []

    async def handler(command: str, timeout_s: float) -> dict[str, Any]:
        ran.append(command)
        return {"stdout": "ok", "stderr": "", "exit_code": 0, "timed_out": False}

    session = proxy.open_session(
        Identity(traj_id="t", run=RUN, task_id="x", family="f", group_id="g"), handler
    )
    async with _client(proxy) as client:
        origin = str(client.base_url).removesuffix("/v1/")
        url = f"{origin}/s/{session.session_id}/rollstream/exec"
        async with httpx.AsyncClient() as http:
            wrong = await http.post(url, json={"command": "id"}, headers={EXEC_TOKEN_HEADER: "0" * 32})
            right = await http.post(
                url, json={"command": "id"}, headers={EXEC_TOKEN_HEADER: session.exec_token}
            )
            finish = await http.post(f"{origin}/v1/rollstream/sessions/{session.session_id}/finish")
            await proxy.take(session.session_id)
            after = await http.post(
                url, json={"command": "id"}, headers={EXEC_TOKEN_HEADER: session.exec_token}
            )
    assert wrong.status_code == 404 and right.json()["stdout"] == "ok" and ran == ["id"]
    assert finish.status_code == 404  # a runner's session is not a client's to publish
    assert after.status_code == 404
