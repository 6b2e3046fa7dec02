"""A GEM game through the real workers, as ``ops.pipeline`` assembles them: producer (source gem)
-> rollout -> reward -> lake."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from consumers.lake import query
from ops import pipeline
from ops.config import load_config
from producers.families.gem import GuessTheNumberExpert
from streams.topology import ensure
from tests.factories import GUESS_RANDOM

pytestmark = pytest.mark.docker
RUN = "gempipe"


async def test_gem_episodes_play_through_the_workers_and_their_rewards_land_in_the_lake(
    js: JetStreamContext,
    nc: NATS,
    sandboxd_owner: str,
    gem_image: str,
    tiny_policy: Path,
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [
            f'state_dir="{tmp_path}"',
            f"run={RUN}",
            'producer.source="gem"',
            f'producer.env_id="{GUESS_RANDOM}"',
            "producer.total=3",
            "lake.flush_interval_s=0.5",
            "rollout.harness.max_total_tokens=1800",
        ],
    )
    expert = GuessTheNumberExpert(tokenizer=AutoTokenizer.from_pretrained(tiny_policy))
    await ensure(js, RUN)
    rows: list[dict[str, object]] = []
    async with anyio.create_task_group() as tg:
        await pipeline.start(tg, ["lake", "reward", "rollout", "producer"], cfg, js, nc, engine=expert)
        with anyio.fail_after(240):
            while len(rows) < 3:
                await anyio.sleep(1)
                if (cfg.lake_root / "trajectories").exists():
                    rows = query(
                        cfg.lake_root, "SELECT family, reward, valid, num_chunks, flags FROM trajectories"
                    ).to_pylist()
        tg.cancel_scope.cancel()
    assert {r["family"] for r in rows} == {f"gem:{GUESS_RANDOM}"}
    assert all(r["valid"] and r["reward"] == 1.0 and r["num_chunks"] >= 1 for r in rows), rows
    assert all(r["flags"] == [] for r in rows), rows  # the security screen passes honest GEM play
    acts = query(cfg.lake_root, "SELECT DISTINCT tool_name FROM chunks").to_pylist()
    assert acts == [{"tool_name": "act"}]
