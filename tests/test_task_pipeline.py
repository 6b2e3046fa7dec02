"""Training on imported tasks: ``producer.source = "harbor"`` and ``"swe"`` through the real workers
as ``ops.pipeline`` assembles them (producer -> rollout -> reward -> lake), with a scripted agent
that knows the fix of some tasks, so the rewards prove the image, the working directory and the
verifier are the ones the task defines."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from transformers import AutoTokenizer

from agent_harness.scripted import ScriptedEngine, episode_body
from agent_harness.tools import format_tool_call
from consumers.lake import query
from ops import pipeline
from ops.config import load_config
from streams.topology import ensure

TASKS = Path(__file__).parent / "data" / "tasks"  # the task directories these tests import
pytestmark = pytest.mark.docker
FIXES = {  # instruction fragment -> the command that solves the task (run in the task's workdir)
    "containing exactly the line": "echo 'Hello, world!' > hello.txt",
    "distinct names": "sort -u names.txt > sorted.txt",
    "greet Ada should print": 'sed -i \'s/"Hello $1"/"Hello, $1!"/\' lib/greet.sh',
}


class KnowsFixes(ScriptedEngine):
    """Runs the known fix of the task (or ``true``), then submits."""

    def next_action(self, context: str) -> str:
        body = episode_body(context)
        if "<tool_response>" in body:
            return format_tool_call("submit", {"answer": "done"})
        command = next((cmd for hint, cmd in FIXES.items() if hint in body), "true")
        return format_tool_call("bash", {"command": command})


async def run_source(
    js: JetStreamContext, nc: NATS, tmp_path: Path, tiny: Path, source: str, path: Path, n: int
) -> list[dict[str, object]]:
    run = f"tasks{source}"
    cfg = load_config(
        None,
        [f'state_dir="{tmp_path}"', f"run={run}", f'producer.source="{source}"', f'producer.path="{path}"',
         f"producer.total={n}", "lake.flush_interval_s=0.5", "rollout.harness.max_total_tokens=2048"],
    )  # fmt: skip
    engine = KnowsFixes(tokenizer=AutoTokenizer.from_pretrained(tiny))
    await ensure(js, run)
    rows: list[dict[str, object]] = []
    async with anyio.create_task_group() as tg:
        await pipeline.start(tg, ["lake", "reward", "rollout", "producer"], cfg, js, nc, engine=engine)
        with anyio.fail_after(180):
            while len(rows) < n:
                await anyio.sleep(1)
                if (cfg.lake_root / "trajectories").exists():
                    sql = "SELECT task_id, family, reward, valid, verifier_output FROM trajectories"
                    rows = query(cfg.lake_root, sql).to_pylist()
        tg.cancel_scope.cancel()
    return sorted(rows, key=lambda r: str(r["task_id"]))


async def test_harbor_tasks_train_through_the_workers_in_their_own_images(
    js: JetStreamContext,
    nc: NATS,
    sandboxd_owner: str,
    tiny_policy: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("hello-file", "sort-unique", "count-errors"):
        (folder / name).symlink_to((TASKS / "harbor" / name).resolve())
    rows = await run_source(js, nc, tmp_path, tiny_policy, "harbor", folder, 3)
    assert [r["task_id"] for r in rows] == ["count-errors@0", "hello-file@0", "sort-unique@0"]
    assert all(r["valid"] and r["family"] == "harbor" for r in rows), rows
    assert [r["reward"] for r in rows] == [0.0, 1.0, 1.0], [r["verifier_output"] for r in rows]


async def test_swe_instances_train_through_the_workers(
    js: JetStreamContext,
    nc: NATS,
    sandboxd_owner: str,
    tiny_policy: Path,
    tmp_path: Path,
    swe_instances: Path,
) -> None:
    rows = await run_source(js, nc, tmp_path, tiny_policy, "swe", swe_instances, 3)
    assert all(r["valid"] and r["family"] == "swe" for r in rows), rows
    rewards = {str(r["task_id"]).split("@")[0]: r["reward"] for r in rows}
    assert rewards == {"greet-punctuation": 1.0, "math-div": 0.0, "math-mul": 0.0}, rows
    assert "FAIL_TO_PASS: 0/1 pass" in str(
        next(r for r in rows if "mul" in str(r["task_id"]))["verifier_output"]
    )
