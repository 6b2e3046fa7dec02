"""A real rollout worker process driven by a scripted engine, for tests that SIGKILL it mid-episode.

``python -m tests.factories.rollout_proc URL RUN POLICY_DIR VERSION HEARTBEAT_S`` runs
``consumers.rollout.run`` with ``SlowSteps`` (the tokenizer of the policy at POLICY_DIR, stamping
VERSION) until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import nats
from transformers import AutoTokenizer

from agent_harness.prompt import IM_END
from agent_harness.scripted import ScriptedEngine, episode_body
from agent_harness.settings import HarnessSettings
from agent_harness.tools import TOOL_CALL_OPEN, format_tool_call
from consumers import rollout
from consumers.settings import RolloutSettings

STEPS = 5  # tool calls before the final answer: 6 chunks in all
STEP_S = 1.5  # each tool call sleeps this long: the window in which a test kills the worker
HARNESS = HarnessSettings(max_new_tokens_per_turn=256, max_total_tokens=6000, command_timeout_s=10.0)


def step_command(n: int) -> str:
    """Idempotent, so that a command cut short by the kill and issued again leaves the same state."""
    return f"touch /work/step{n} && sleep {STEP_S}"


class SlowSteps(ScriptedEngine):
    """``STEPS`` slow bash calls (``step_command``), then a final answer."""

    def next_action(self, context: str) -> str:
        done = episode_body(context).count(TOOL_CALL_OPEN)
        if done < STEPS:
            return format_tool_call("bash", {"command": step_command(done)})
        return f"all {STEPS} steps done{IM_END}"


async def main(url: str, run: str, policy: str, version: int, heartbeat_s: float) -> None:
    tokenizer = AutoTokenizer.from_pretrained(policy)
    nc = await nats.connect(url)
    settings = RolloutSettings(concurrency=2, heartbeat_s=heartbeat_s, harness=HARNESS)
    engine = SlowSteps(tokenizer=tokenizer, version=version)
    await rollout.run(settings, nc.jetstream(), nc, run=run, policy_dir=Path(policy), engine=engine)


if __name__ == "__main__":
    url, run, policy, version, heartbeat = sys.argv[1:6]
    anyio.run(main, url, run, policy, int(version), float(heartbeat))
