"""A scripted agent program: the shape of a real one, but it always solves its task.

Started by the agent runner (``[rollout] agent = "command"``) as
``python -m tests.agents.scripted_agent {base_url} {instruction}``. It asks the model for every
step with the official ``openai`` client, streaming (what the model says is recorded, then
ignored), runs the command that solves the task through ``rs-exec`` in the sandbox, feeds the
output back, and finally compacts its history (drops all but the last exchange) before one last
call, so its episode has two segments. The instruction names the word to write: "... the word
<w> ...".
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import openai


def ask(client: openai.OpenAI, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One streamed call; the assistant message rebuilt from its deltas."""
    text, calls = "", {}
    stream = client.chat.completions.create(
        model="rollstream",
        messages=messages,
        stream=True,
        max_tokens=8,
        stream_options={"include_usage": True},
    )
    for event in stream:
        for choice in event.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls.values()
        ]
    return message


def main() -> int:
    base_url, instruction = sys.argv[1], sys.argv[2]
    word = re.search(r"the word (\w+)", instruction)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": instruction}]
    answer = word.group(1) if word else "nothing"
    for command in (f"echo {answer} > answer.txt && cat answer.txt && id -u", "ls"):
        reply = ask(client, messages)
        messages.append(
            {"role": "assistant", "content": reply["content"] or "ok"} if "tool_calls" in reply else reply
        )
        done = subprocess.run(["rs-exec", command], capture_output=True, text=True, check=False)
        messages.append({"role": "user", "content": f"[{done.returncode}] {done.stdout}{done.stderr}"})
    ask(client, [{"role": "user", "content": "Summary: the answer is written."}, *messages[-2:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
