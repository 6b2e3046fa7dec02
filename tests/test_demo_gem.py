"""The GEM learning demonstration (``ops.demo`` with ``ops.demo_gem.GemPlan``) at a tiny budget: every
phase runs on real parts (its own nats-server and sandboxd, real Docker sandboxes of the ``gem``
image, real torch)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agent_harness.engine import GenRequest
from agent_harness.prompt import prompt_tokens
from consumers.lake import query
from learner.checkpoint import latest_checkpoint, read_state
from learner.warmstart import WARM_VERSION
from ops.demo import run_demo
from ops.demo_gem import GemPlan
from producers.families.gem import GemToolRegistry, GuessTheNumberExpert, gem_task, next_guess
from tests.factories import GUESS

INSTRUCTION = (
    "You have to guess the number between 1 and 10 (inclusive) within 4 turns.\n"
    "At turn 1, you guessed 5, and the target number is higher than 5."
)


async def _guesses(guesser: GuessTheNumberExpert, tokenizer: object, n: int) -> list[int]:
    task = gem_task(GUESS, 0, INSTRUCTION)
    prompt = prompt_tokens(tokenizer, task.instruction, GemToolRegistry())
    out = []
    for _ in range(n):
        [gen] = await guesser.generate([GenRequest(prompt_tokens=prompt, max_new_tokens=32)])
        text = tokenizer.decode(gen.tokens)  # type: ignore[attr-defined]
        found = re.search(r"boxed\{(\d+)\}", text)
        assert found, text
        out.append(int(found.group(1)))
    return out


async def test_the_gem_expert_searches_at_error_rate_zero_and_guesses_in_range_at_one(
    tiny_policy: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    exact = await _guesses(GuessTheNumberExpert(tokenizer=tokenizer, error_rate=0.0, seed=1), tokenizer, 5)
    assert exact == [next_guess(INSTRUCTION)] * 5 == [8] * 5
    noisy = await _guesses(GuessTheNumberExpert(tokenizer=tokenizer, error_rate=1.0, seed=1), tokenizer, 40)
    assert set(noisy) <= set(range(1, 11)) and len(set(noisy)) >= 5


@pytest.mark.docker
async def test_a_tiny_gem_demo_seeds_warm_starts_trains_past_the_warm_version_and_tabulates(
    gem_image: str,
    tmp_path: Path,
) -> None:
    plan = replace(
        GemPlan(),
        seed_episodes=6,
        eval_episodes=3,
        random_episodes=3,
        sft_steps=6,
        online_seconds=20.0,
        group_size=2,
        concurrency=4,
        rl={**GemPlan().rl, "batch_size": 2, "batch_timeout_s": 3.0},
    )
    result = await run_demo(tmp_path, plan)

    lake = tmp_path / "state" / "lake"
    [expert] = query(
        lake,
        "SELECT count(*) AS n, bool_and(replay_mode = 'sft') AS sft, min(family) AS family "
        "FROM trajectories WHERE run = 'seed' AND source = 'expert'",
    ).to_pylist()
    assert expert == {"n": 6, "sft": True, "family": "gem:game:GuessTheNumber-v0-easy"}
    warm = latest_checkpoint(tmp_path / "state" / "warm")
    assert warm is not None and read_state(warm).version == WARM_VERSION
    assert result.demonstrations >= 1 and len(result.sft_loss) == plan.sft_steps
    assert result.versions["ipa"] > WARM_VERSION
    online = query(lake, "SELECT DISTINCT reward FROM trajectories WHERE run = 'ipa' AND valid").to_pylist()
    assert online and {r["reward"] for r in online} <= {0.0, 1.0}  # scored by win, not graded
    assert result.random is not None and 1 <= result.random.n <= 3 and 1 <= result.expert.n <= 6
    assert 1 <= result.warm.n <= 3 and 1 <= result.after["ipa"].n <= 3  # valid episodes only

    table = result.table()
    for label in (
        "random player (floor)",
        "scripted expert",
        "after SFT warm start",
        f"after online IPA (v{result.versions['ipa']})",
    ):
        assert label in table
    assert (tmp_path / "demo.txt").read_text(encoding="utf-8") == table + "\n"
    assert (tmp_path / "success_by_version.png").stat().st_size > 0
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
