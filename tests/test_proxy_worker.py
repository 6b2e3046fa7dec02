"""The proxy worker as `just up` would run it: the tiny torch policy behind an OpenAI endpoint."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import openai
from nats.js import JetStreamContext

from consumers import proxy_worker
from ops.config import load_config
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.codec import scored_decoder
from streams.topology import TRAJ, ensure, subject
from tests.factories import make_tiny_policy

RUN = "proxyw"


async def test_an_openai_client_session_becomes_a_scored_trajectory_on_the_broker(
    js: JetStreamContext, tmp_path: Path
) -> None:
    cfg = load_config(
        None, [f'state_dir="{tmp_path}"', f"run={RUN}", "proxy.port=0", "proxy.max_new_tokens=12"]
    )
    await anyio.to_thread.run_sync(make_tiny_policy, cfg.policy_dir)
    await ensure(js, RUN)
    sub = await js.pull_subscribe(subject("scored", RUN), stream=TRAJ.name)
    async with anyio.create_task_group() as tg:
        url = await tg.start(proxy_worker.run, cfg, js)
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
