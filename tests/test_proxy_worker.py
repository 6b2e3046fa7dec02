"""The proxy worker as `just up` would run it: the tiny torch policy behind an OpenAI endpoint."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import httpx
import openai
from nats.js import JetStreamContext

from agent_harness.proxy import ProxySettings
from consumers import proxy_worker
from consumers.settings import RolloutSettings
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.codec import scored_decoder
from streams.topology import TRAJ, ensure, subject
from tests.factories import make_tiny_policy

RUN = "proxyw"


async def test_an_openai_client_session_becomes_a_scored_trajectory_on_the_broker(
    js: JetStreamContext, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policy"
    await anyio.to_thread.run_sync(make_tiny_policy, policy_dir)
    await ensure(js, RUN)
    sub = await js.pull_subscribe(subject("scored", RUN), stream=TRAJ.name)
    async with anyio.create_task_group() as tg:
        settings = ProxySettings(port=0, max_new_tokens=12)
        proxy = functools.partial(
            proxy_worker.run, settings, RolloutSettings(), js, run=RUN, policy_dir=policy_dir
        )
        url = await tg.start(proxy)
        client = openai.AsyncOpenAI(base_url=url, api_key="unused")
        messages = [{"role": "user", "content": "Write the word apple to answer.txt."}]
        for _ in range(2):
            reply = await client.chat.completions.create(
                model="rollstream",
                messages=messages,
                user="s1",
                max_tokens=12,  # type: ignore[arg-type]
            )
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": "go on"},
            ]
        async with httpx.AsyncClient() as http:
            done = await http.post(f"{url}/rollstream/sessions/s1/finish", json={"reward": 1.0})
            assert done.status_code == 200, done.text
        msgs = await sub.fetch(1, timeout=10)
        tg.cancel_scope.cancel()
    scored = scored_decoder.decode(msgs[0].data)
    assert scored.reward == 1.0 and scored.traj.source == "proxy"
    assert len(scored.traj.chunks) >= 2
    for chunk in scored.traj.chunks:
        assert chunk.policy_version == 0
        assert len(unpack_tokens(chunk.action_tokens)) == len(unpack_logprobs(chunk.action_logprobs)) > 0
