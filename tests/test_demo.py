"""The files learning demonstration (``ops.demo``) at a tiny budget, on real parts (its own
nats-server and sandboxd, real Docker sandboxes, real torch), and its result table and plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from consumers.lake import query
from learner.checkpoint import latest_checkpoint, read_state
from learner.warmstart import WARM_VERSION
from ops.demo import DemoPlan, DemoResult, Rate, run_demo


def test_a_rate_carries_its_wilson_interval_and_the_table_lists_every_phase(tmp_path: Path) -> None:
    rate = Rate(7, 10)
    assert rate.value == 0.7
    lo, hi = rate.interval
    assert abs(lo - 0.3968) < 1e-3 and abs(hi - 0.8922) < 1e-3
    assert Rate(0, 0).value == 0.0
    result = DemoResult(
        expert=Rate(116, 160),
        warm=Rate(200, 256),
        after={"ipa": Rate(240, 256), "grpo": Rate(230, 256), "ipa_nois": Rate(220, 256)},
        versions={"ipa": 90, "grpo": 88, "ipa_nois": 80},
        wall={"seed": 95.0, "warm": 240.0, "ipa": 460.0, "grpo": 455.0, "ipa_nois": 450.0, "total": 1260.0},
    )
    table = result.table()
    assert "72.5%" in table and "n=160" in table
    assert "after online IPA (v90)" in table and "93.8%" in table
    assert "after online GRPO (v88)" in table and table.splitlines()[-1].split()[-1] == "1260"
    ablation = next(x for x in table.splitlines() if x.startswith("after online IPA w/o failure IS (v80) "))
    assert ablation.split()[-3:] == ["90%]", "n=256", "450"]  # the ablation, named, its columns aligned
    png = result.plot(tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arms = {a["arm"]: a for a in json.loads(result.to_json())["arms"]}
    assert list(arms) == ["expert", "warm", "ipa", "grpo", "ipa_nois"]
    assert (arms["ipa"]["successes"], arms["ipa"]["episodes"], arms["ipa"]["version"]) == (240, 256, 90)
    lo, hi = arms["warm"]["ci95"]
    assert lo < 200 / 256 < hi and hi < arms["ipa"]["ci95"][0]  # IPA's interval lies above


def test_a_measured_floor_leads_the_table_and_online_curves_follow_the_total(tmp_path: Path) -> None:
    result = DemoResult(
        random=Rate(20, 64),
        expert=Rate(90, 120),
        warm=Rate(33, 64),
        after={"ipa": Rate(29, 64)},
        versions={"ipa": 40},
        online={"ipa": [(1, 30, 0.5), (11, 40, 0.45)]},
        wall={"random": 50.0, "seed": 300.0, "warm": 200.0, "ipa": 600.0, "total": 1200.0},
    )
    lines = result.table().splitlines()
    assert lines[1].startswith("random player (floor)") and "31.2%" in lines[1] and "n=64" in lines[1]
    assert lines[2].startswith("scripted expert (errs)") and lines[-2].startswith("total")
    assert lines[-1] == "ipa rollouts successful by policy version: v1: 50% of 30, v11: 45% of 40"
    assert result.plot(tmp_path / "demo.png").stat().st_size > 0


@pytest.mark.docker
async def test_a_tiny_demo_seeds_warm_starts_trains_every_arm_and_seed_and_reports(tmp_path: Path) -> None:
    plan = replace(
        DemoPlan(),
        minutes=0.1,
        levels=(1, 2),
        expert_levels=(1,),  # level 2 is never demonstrated
        runs=("ipa", "grpo", "ipa_nois"),
        online_seeds=(0, 1),
        online_samples=4,  # every run stops after its first trained batch (or 12 s)
        seed_episodes=8,
        sft_steps=3,
        sft_batch=4,
        eval_episodes=4,
        concurrency=4,
        min_online_s=12.0,
        # dynamic sampling off: after 3 SFT steps the policy fails nearly every task, so almost every
        # group would be dropped as uninformative and no arm would step within its 12 s
        rl={**DemoPlan().rl, "batch_size": 4, "batch_timeout_s": 2.0, "dynamic_sampling": False},
    )
    result = await run_demo(tmp_path, plan)
    state = tmp_path / "state"
    runs = [f"{arm}-s{seed}" for seed in (0, 1) for arm in ("ipa", "grpo", "ipa_nois")]
    seeded = query(state / "lake", "SELECT count(*) AS n FROM trajectories WHERE run = 'seed'").to_pylist()
    assert seeded == [{"n": 8}]
    levels = query(
        state / "lake", "SELECT DISTINCT run, substr(task_id, -2) AS level FROM trajectories ORDER BY 1, 2"
    ).to_pylist()
    assert {r["level"] for r in levels if r["run"] == "seed"} == {"L1"}  # the expert shows level 1 only
    assert {r["level"] for r in levels if r["run"] == "ipa-s0"} <= {"L1", "L2"}
    assert result.expert.n == 8 and result.warm.n == 4
    assert list(result.after) == runs and all(rate.n == 4 for rate in result.after.values())
    assert result.arms["grpo-s1"] == ("grpo", 1)
    for run in runs:
        final = latest_checkpoint(state / "checkpoints" / run)
        assert final is not None and read_state(final).version == result.versions[run] > WARM_VERSION
        assert result.trained[run] >= 4  # the count, not only the 12 s, ends a run that reaches it
    assert (tmp_path / "demo.txt").read_text(encoding="utf-8") == result.table() + "\n"
    doc = json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))
    assert [a["arm"] for a in doc["arms"]] == ["expert", "warm", *runs]
    assert all(a["episodes"] == 4 and 0 <= a["ci95"][0] <= a["rate"] <= a["ci95"][1] for a in doc["arms"][1:])
    assert [(p["method"], p["episodes"]) for p in doc["pooled"]] == [("ipa", 8), ("grpo", 8), ("ipa_nois", 8)]
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "success_by_version.png").is_file()


def test_arms_run_with_several_seeds_are_pooled_in_the_table_the_json_and_the_plot(tmp_path: Path) -> None:
    after = {"ipa-s0": Rate(240, 256), "ipa-s1": Rate(230, 256), "grpo-s0": Rate(200, 256)}
    arms = {"ipa-s0": ("ipa", 0), "ipa-s1": ("ipa", 1), "grpo-s0": ("grpo", 0)}
    result = DemoResult(
        expert=Rate(116, 160),
        warm=Rate(200, 256),
        after=after,
        arms=arms,
        trained={"ipa-s0": 400, "ipa-s1": 416, "grpo-s0": 400},
        versions={"ipa-s0": 26, "ipa-s1": 27, "grpo-s0": 26},
        wall={"ipa-s0": 300.0, "ipa-s1": 310.0, "grpo-s0": 305.0, "total": 1000.0},
    )
    lines = result.table().splitlines()
    assert any(x.startswith("after online IPA, seed 1 (v27) ") and "89.8%" in x for x in lines)
    assert any(x.startswith("after online GRPO (v26) ") for x in lines)  # one seed: no seed in its name
    pooled = next(x for x in lines if x.startswith("IPA, 2 seeds pooled"))
    assert "91.8%" in pooled and "n=512" in pooled and pooled.endswith("seeds: 93.8%, 89.8%")
    assert "online samples trained: ipa-s0 400, ipa-s1 416, grpo-s0 400" in lines
    doc = json.loads(result.to_json())
    row = next(a for a in doc["arms"] if a["arm"] == "ipa-s1")
    assert (row["method"], row["seed"], row["trained"], row["successes"]) == ("ipa", 1, 416, 230)
    [ipa] = doc["pooled"]  # GRPO ran one seed: nothing to pool
    assert (ipa["method"], ipa["successes"], ipa["episodes"]) == ("ipa", 470, 512)
    assert ipa["ci95"][0] < 470 / 512 < ipa["ci95"][1] and ipa["seed_rates"] == [240 / 256, 230 / 256]
    assert result.plot(tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--online-seeds", "0,x"], "'0,x' is not a comma-separated list of integers"),
        (["--online-seeds", "1,1"], "'1,1': give distinct non-negative integers"),
        (["--online-samples", "-5"], "--online-samples: give 0 (time shares) or a positive count"),
    ],
)
def test_the_demo_command_line_refuses_bad_seeds_and_sample_counts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ops.demo_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_demo_command_line_refuses_an_unknown_arm_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from ops.demo_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", "ipa,bogus", "--no-dynamic-sampling"])
    assert exit_info.value.code == 2
    assert "--runs: unknown arm 'bogus'; choose from ipa, grpo, ipa_nois" in capsys.readouterr().err
