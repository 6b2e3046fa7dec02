"""``rollstream eval`` on real sandboxes: every imported task passes its own oracle, broken ones are
named with their reason, the tests stay out of the agent's reach, the embedded policy gets a
pass@k that lands in the lake, two versions compare, and ``--every N`` evaluates new versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from consumers.lake import query
from learner.checkpoint import CheckpointState
from ops.cli import app
from ops.config import Config, load_config
from ops.evaluation import worker
from ops.evaluation.evaluate import evaluate, load_task_set
from ops.evaluation.runner import Plan, attempt
from ops.evaluation.sandboxes import private_sandboxes
from ops.evaluation.summary import broken, summarize
from producers.families import tools_for
from schemas.task import Oracle, Verifier

TASKS = Path(__file__).parent / "data" / "tasks"  # the task directories these tests import
pytestmark = pytest.mark.docker


def config(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [f'state_dir="{tmp_path}"', "run=evaltest", *extra])


def task_folder(tmp_path: Path, *dirs: Path) -> Path:
    """A folder whose entries link to the given task directories."""
    folder = tmp_path / "taskset"
    folder.mkdir()
    for d in dirs:
        (folder / d.name).symlink_to(d.resolve())
    return folder


async def test_every_imported_task_passes_its_oracle_and_the_broken_ones_are_named(
    tmp_path: Path, base_image: str
) -> None:
    dirs = [*sorted((TASKS / "harbor").iterdir()), *sorted((TASKS / "tb1").iterdir())]
    folder = task_folder(tmp_path, *dirs, *sorted((TASKS / "broken").iterdir()))
    tasks, items = load_task_set(folder)
    assert len(tasks) == 14 and all(i.ok for i in items)
    cfg = config(tmp_path)
    [outcome] = await evaluate(
        cfg, tasks, task_set=str(folder), agent="oracle", policies=[], k=1, concurrency=4
    )
    failed = broken(outcome.records)
    assert set(failed) == {"harbor-wrong-oracle", "tb1-wrong-oracle"}, failed
    assert "reward 0" in failed["harbor-wrong-oracle"] and "exit code 2" in failed["tb1-wrong-oracle"]
    good = [r for r in outcome.records if r.task_id not in failed]
    assert len(good) == 12 and summarize(good, 1).pass1.value == 1.0
    assert {r.task_id: r.reward for r in good}["three-files"] == 1.0  # a partial-credit verifier, fully met
    rows = query(
        cfg.lake_root, "SELECT count(*) AS n, min(policy_version) AS v FROM evals WHERE agent = 'oracle'"
    )
    assert rows.to_pylist() == [{"n": 14, "v": -1}]


async def test_swe_oracles_pass_and_a_gold_patch_that_breaks_a_test_is_named(
    tmp_path: Path, base_image: str, swe_instances: Path
) -> None:
    cfg = config(tmp_path)
    tasks, _ = load_task_set(swe_instances)
    bad, _ = load_task_set(swe_instances.parent / "broken.jsonl")
    async with private_sandboxes(cfg.sandboxd, 4) as sandbox:
        plan = Plan(eval_id="e", run="evaltest", task_set="swe", agent="oracle", policy="oracle", version=-1,
                    k=1, concurrency=3)  # fmt: skip
        records = [
            await attempt(
                plan, t, 0, sandbox=sandbox, engine=None, harness=cfg.rollout.harness, tools_for=tools_for
            )
            for t in [*tasks, *bad]
        ]
    assert [r.passed for r in records] == [True, True, True, False], [r.verifier_output for r in records]
    why = broken(records)["math-mul-wrong-gold"]
    assert "broken: test_add" in why and "still failing: test_mul" in records[-1].verifier_output


async def test_the_agent_never_sees_the_tests_and_cannot_plant_a_reward(
    tmp_path: Path, base_image: str
) -> None:
    [hello], _ = load_task_set(TASKS / "harbor" / "hello-file")
    assert hello.verifier is not None
    cfg = config(tmp_path)
    plant = "mkdir -p /logs/verifier /tests && echo 1 > /logs/verifier/reward.txt"
    plant += " && echo 'exit 0' > /tests/test.sh"
    look = "ls -A /tests /solution/../tests 2>&1 | tee /app/seen.txt"
    saw_nothing = Verifier(
        command="bash /tests/test.sh",
        files={
            "/tests/test.sh": b"grep -q 'No such file' /app/seen.txt && echo 1 > /logs/verifier/reward.txt"
        },
    )
    cases = [
        (msgspec.structs.replace(hello, oracle=Oracle(command=plant)), 0.0),  # planted reward and test: wiped
        (
            msgspec.structs.replace(hello, task_id="look", oracle=Oracle(command=look), verifier=saw_nothing),
            1.0,
        ),
    ]
    async with private_sandboxes(cfg.sandboxd, 3) as sandbox:
        plan = Plan(eval_id="e", run="evaltest", task_set="x", agent="oracle", policy="oracle", version=-1,
                    k=1, concurrency=1)  # fmt: skip
        for task, want in cases:
            rec = await attempt(
                plan, task, 0, sandbox=sandbox, engine=None, harness=cfg.rollout.harness, tools_for=tools_for
            )
            assert rec.valid and rec.reward == want, rec.verifier_output


def install_policy(tmp_path: Path, tiny: Path) -> Path:
    base = tmp_path / "policy" / "base"
    shutil.copytree(tiny, base)
    return base


def fake_checkpoint(cfg: Config, base: Path, version: int, step: int) -> Path:
    """A checkpoint of ``version`` (the base weights, as the learner's directory layout has them)."""
    d = cfg.state / "checkpoints" / cfg.run / f"step-{step:08d}"
    shutil.copytree(base, d)
    (d / "state.json").write_bytes(msgspec.json.encode(CheckpointState(version=version, step=step)))
    return d


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI would point structlog at CliRunner's stream, closed after the test: loggers cached
    meanwhile (cache_logger_on_first_use) would then fail in later test modules."""
    monkeypatch.setattr("ops.evaluation.cli.configure_logging", lambda *a, **k: None)


def test_the_cli_compares_two_versions_of_the_embedded_policy_and_writes_the_lake(
    tmp_path: Path,
    base_image: str,
    tiny_policy: Path,
) -> None:
    base = install_policy(tmp_path, tiny_policy)
    cfg = config(tmp_path)
    fake_checkpoint(cfg, base, version=3, step=30)
    folder = task_folder(tmp_path, TASKS / "harbor" / "hello-file", TASKS / "harbor" / "prebuilt-image")
    args = [
        "eval",
        "--tasks",
        str(folder),
        "--policy",
        "v0",
        "--policy",
        "v3",
        "--k",
        "2",
        "--concurrency",
        "2",
    ]
    sets = [
        "--set",
        f'state_dir="{tmp_path}"',
        "--set",
        "run=evaltest",
        "--set",
        "rollout.harness.max_total_tokens=256",
    ]
    result = CliRunner().invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    assert "pass@1, pass@2" in result.output and "Δ pass@1" in result.output
    rows = query(
        cfg.lake_root,
        "SELECT policy, policy_version AS v, count(*) AS n, avg(reward) AS r, min(num_action_tokens) AS t "
        "FROM evals GROUP BY 1, 2 ORDER BY 2",
    ).to_pylist()
    assert [(r["policy"], r["v"], r["n"]) for r in rows] == [("v0", 0, 4), ("v3", 3, 4)]
    assert all(0.0 <= r["r"] <= 1.0 and r["t"] > 0 for r in rows)  # the policy acted: a measured pass rate


async def test_every_n_evaluates_each_due_version_once_even_across_restarts(
    tmp_path: Path,
    base_image: str,
    tiny_policy: Path,
) -> None:
    base = install_policy(tmp_path, tiny_policy)
    folder = task_folder(tmp_path, TASKS / "harbor" / "prebuilt-image")
    cfg = config(
        tmp_path, f'eval.tasks="{folder}"', "eval.every=2", "eval.k=1", "eval.concurrency=1",
        "rollout.harness.max_total_tokens=128",
    )  # fmt: skip
    for version, step in ((2, 20), (2, 25), (3, 30)):
        fake_checkpoint(cfg, base, version=version, step=step)
    await worker.watch(cfg, rounds=1)
    sql = "SELECT policy_version AS v, count(*) AS n FROM evals GROUP BY 1 ORDER BY 1"
    assert query(cfg.lake_root, sql).to_pylist() == [{"v": 0, "n": 1}, {"v": 2, "n": 1}]
    fake_checkpoint(cfg, base, version=4, step=40)
    await worker.watch(cfg, rounds=1)  # a restarted evaluator: only the new due version
    assert query(cfg.lake_root, sql).to_pylist() == [{"v": 0, "n": 1}, {"v": 2, "n": 1}, {"v": 4, "n": 1}]


def test_an_unknown_policy_version_is_one_line_naming_the_versions_there(tmp_path: Path) -> None:
    args = ["eval", "--tasks", str(TASKS / "harbor" / "hello-file"), "--policy", "v7"]
    result = CliRunner().invoke(app, [*args, "--set", f'state_dir="{tmp_path}"', "--set", "run=evaltest"])
    assert result.exit_code == 2 and "no checkpoint of version 7" in result.output
    assert "versions: none" in result.output


def test_an_eval_section_turns_on_the_background_evaluator_of_just_up(tmp_path: Path) -> None:
    from ops.supervisor import Supervisor

    assert Supervisor(config(tmp_path)).desired["eval"] == 0
    on = config(tmp_path, f'eval.tasks="{TASKS / "harbor"}"', "eval.every=10")
    assert Supervisor(on).desired["eval"] == 1


@pytest.mark.slow
async def test_an_envhub_spec_stands_in_offline_for_a_dockerfile_whose_base_cannot_be_pulled(
    tmp_path: Path, base_image: str
) -> None:
    """The task's Dockerfile starts FROM an image this host lacks; its environment/envhub.toml
    (packages, files, workdir, env) is built instead (mmdebstrap, ~1-2 min the first time) and its
    oracle passes in it."""
    tasks, _ = load_task_set(TASKS / "envhub" / "greeting-offline")
    assert tasks[0].image.startswith("rollstream-task:") and tasks[0].workdir == "/app"
    [outcome] = await evaluate(
        config(tmp_path), tasks, task_set="envhub", agent="oracle", policies=[], k=1, concurrency=1
    )
    assert [r.reward for r in outcome.records] == [1.0], outcome.records[0].verifier_output
