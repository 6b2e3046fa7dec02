"""The rollout benchmark runs real episodes with tiny counts and reports well-formed rows.

No timing assertions: speed goals live in the benchmark's table (``python -m ops.bench.rollout``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench.rollout import bench_level, render
from sandboxd.client import SandboxClient

pytestmark = pytest.mark.docker


async def test_benchmark_rows_account_for_every_episode_and_render(
    sandbox_client: SandboxClient,
    tiny_policy: Path,
) -> None:
    rows = [
        await bench_level(tiny_policy, sandbox_client, 2, 2, batched=True),
        await bench_level(tiny_policy, sandbox_client, 2, 2, batched=False),
    ]
    for row in rows:
        assert row.episodes == 2 and row.chunks >= 2 and row.action_tokens >= row.chunks
        assert row.gen_s > 0 and row.sbx_s > 0 and row.wall_s > 0
        assert 1.0 <= row.mean_batch <= 2.0
        assert row.episodes_s > 0 and row.tokens_s > 0 and row.overhead_fraction >= 0
    assert rows[1].mean_batch == 1.0
    assert render(rows).row_count == 2
