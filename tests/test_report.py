"""The lake report: plots from a realistic two-run lake, summary numbers that match it, empty lakes."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from consumers.lake import EvalRecord, LakeWriter
from ops.report import (
    PLOTS,
    eval_points,
    plot_reward_by_version,
    plot_success_by_version,
    pool_versions,
    pooled_versions,
    report_command,
    version_bins,
    wilson_interval,
    write_report,
)
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import ScoredTrajectory
from tests.factories import DAY, STALENESS_BOUND, make_step, make_task, make_train, scored_at

VERSIONS = 6
PER_VERSION = 8
BOUND = STALENESS_BOUND  # the max_staleness of every make_train record
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Written:
    """What a test lake holds, kept on the side to check the report against."""

    scored: list[ScoredTrajectory] = field(default_factory=list)
    train: list[TrainRecord] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)


def write_run(writer: LakeWriter, run: str, wins: list[int], seed: int) -> Written:
    """One run: 8 online trajectories per version with ``wins[v]`` successes, 2 infrastructure
    failures, 4 expert demonstrations, the learner's account of each (1 in 8 dropped as stale,
    failures dropped as invalid, one replayed sample far past the bound) and 2 steps per version."""
    rng, out = random.Random(seed), Written()
    for v in range(VERSIONS):
        for k in range(PER_VERSION):
            s = scored_at(rng, run, v, k, reward=float(k < wins[v]))
            out.scored.append(s)
            if k == PER_VERSION - 1:
                out.train.append(make_train(s, v + BOUND + 1, fate="dropped", reason="stale"))
            else:
                out.train.append(make_train(s, v + k % (BOUND + 1)))
    for v in (1, 4):
        s = scored_at(rng, run, v, 9, reward=0.0, valid=False)
        out.scored.append(s)
        out.train.append(make_train(s, v, fate="dropped", reason="invalid"))
    out.scored += [scored_at(rng, run, 0, k, reward=1.0, source="expert") for k in range(4)]
    out.train.append(make_train(out.scored[-1], VERSIONS + 5, source="replay"))
    for step in range(1, 2 * VERSIONS + 1):
        out.steps.append(
            make_step(
                step,
                run=run,
                loss=1.0 / step,
                samples=7,
                mean_ratio=1.0 + 0.04 * (-1) ** step,
                masked_fraction=0.05,
                grad_norm=1.5,
                time=DAY + step * 150,
                wait_s=5.0,
                busy_s=15.0,
            )
        )
    for s in out.scored:
        writer.add_scored(s)
    writer.add_scored(out.scored[0])  # a redelivered copy: the views count it once
    records: list[TrainRecord | StepStats] = [*out.train, *out.steps]
    for record in records:
        writer.add_train(record)
    writer.add_task(make_task(run))
    for v in (0, 2, 4):  # `rollstream eval` every 2 versions: 4 tasks x 4 attempts, better with training
        for task in range(4):
            for attempt in range(4):
                record = EvalRecord(
                    eval_id=f"{run}-v{v}", run=run, task_set="held-out", task_id=f"t{task}",
                    attempt=attempt, agent="policy", policy=f"v{v}", policy_version=v,
                    reward=1.0, passed=(task + attempt) % 8 < v + wins[0], time=DAY + v * 300,
                )  # fmt: skip
                writer.add_eval(record)
    return out


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, dict[str, Written]]:
    """A lake with an IPA run that learns (1 → 8 wins of 8) and a GRPO baseline that learns slower."""
    lake = tmp_path / "lake"
    writer = LakeWriter(lake, writer_id="test")
    written = {
        "ipa": write_run(writer, "ipa", [1, 2, 4, 5, 7, 8], seed=1),
        "grpo": write_run(writer, "grpo", [1, 1, 2, 3, 3, 4], seed=2),
    }
    writer.flush()
    return lake, written


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def pct(rewards: list[float]) -> str:
    return f"{sum(rewards) / len(rewards):.1%}"


def line(summary: str, key: str, *, contains: str = "") -> str:
    """The summary line that starts with ``key`` (or, after it, contains ``contains``)."""
    lines = summary.splitlines()
    start = next(i for i, text in enumerate(lines) if text.startswith(key))
    return next(text for text in lines[start:] if contains in text)


def test_a_two_run_lake_gets_every_plot_as_a_readable_png(
    two_runs: tuple[Path, dict[str, Written]], tmp_path: Path
) -> None:
    lake, _ = two_runs
    result = write_report(lake, tmp_path / "report")

    assert [p.name for p in result.plots] == list(PLOTS)
    assert result.skipped == {}
    for path in result.plots:
        width, height = png_size(path)
        assert 800 <= width <= 1400 and 450 <= height <= 1000, (path.name, width, height)
        assert path.stat().st_size > 20_000  # drawn, not blank
    assert result.summary_path.read_text() == result.summary


def test_the_summary_matches_the_lake(two_runs: tuple[Path, dict[str, Written]], tmp_path: Path) -> None:
    lake, written = two_runs
    summary = write_report(lake, tmp_path / "report").summary

    everything = [s for w in written.values() for s in w.scored]
    assert f"trajectories  {len(everything)} (valid {len(everything) - 4}, invalid 4: sandbox 4)" in summary
    assert "sources       online 100, expert 8" in summary
    assert "versions      6 seen (0–5)" in summary
    for run, w in written.items():
        valid = [s for s in w.scored if s.valid]
        last = [s.reward for s in valid if s.traj.min_version >= VERSIONS - 3]
        first = [s.reward for s in valid if s.traj.min_version < 3]
        text = line(summary, "success", contains=f" {run} ")
        assert f"{pct([s.reward for s in valid])} overall" in text
        assert f"first 3 versions (0–2) {pct(first)}" in text
        assert f"last 3 versions (3–5) {pct(last)}" in text
    assert "last 3 versions (3–5) 83.3%" in line(summary, "success", contains=" ipa ")
    trained = sum(r.fate == "trained" for w in written.values() for r in w.train)
    assert f"train_log     trained {trained} (2 not online), dropped 16 (stale 12, invalid 4)" in summary
    assert "max trained (online) 2, bound 2; audit: 0 online samples trained past the bound — OK" in summary
    assert (
        "steps         grpo 12 (steps 1–12, policy version 12); ipa 12 (steps 1–12, policy version 12)"
        in summary
    )
    waste = line(summary, "waste")
    assert "stale drops 12 of " in waste and "learner idle 25.0% of " in waste, waste
    # first trajectory started 30.5 s before DAY; the last step is 12 x 150 s after it
    assert "wall time     2026-01-01 11:59:29 → 2026-01-01 12:30:00 UTC (30 min 30 s)" in summary


def test_a_report_for_one_run_sees_only_that_run(
    two_runs: tuple[Path, dict[str, Written]], tmp_path: Path
) -> None:
    lake, written = two_runs
    result = write_report(lake, tmp_path / "ipa", run="ipa")

    assert "(run ipa)" in result.summary and "grpo" not in result.summary
    assert f"trajectories  {len(written['ipa'].scored)} (valid" in result.summary
    assert len(result.plots) == len(PLOTS)


def test_a_sample_trained_past_the_bound_fails_the_audit(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    scored = scored_at(random.Random(3), "ipa", 0, 0, reward=1.0)
    writer.add_scored(scored)
    writer.add_train(make_train(scored, BOUND + 2))
    writer.flush()

    summary = write_report(tmp_path / "lake", tmp_path / "report").summary

    assert (
        "max trained (online) 4, bound 2; audit: 1 online samples trained past the bound — VIOLATED"
        in summary
    )


def test_plots_without_data_are_skipped_and_named(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(4)
    for v in range(3):
        writer.add_scored(scored_at(rng, "ipa", v, 0, reward=1.0))
    writer.flush()
    out = tmp_path / "report"
    out.mkdir()
    (out / "loss.png").write_bytes(PNG_MAGIC)  # an earlier report's plot must not survive

    result = write_report(tmp_path / "lake", out)

    assert [p.name for p in result.plots] == [
        "success_by_version.png",
        "reward_by_version.png",
        "throughput.png",
    ]
    assert set(result.skipped) == {"staleness.png", "loss.png", "eval_by_version.png"}
    assert "skipped       loss.png: no train_steps rows" in result.summary
    assert "eval_by_version.png: no policy evaluations (rollstream eval)" in result.summary
    assert "train_log     none" in result.summary and "steps         none" in result.summary
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize("run", [None, "nosuch"])
def test_an_empty_lake_gives_a_summary_saying_so_and_no_plots(tmp_path: Path, run: str | None) -> None:
    result = write_report(tmp_path / "missing-lake", tmp_path / "report", run=run)

    assert result.plots == []
    assert "nothing to report" in result.summary
    assert "plots         none drawn (no data)" in result.summary
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["summary.txt"]


def test_the_command_prints_the_summary_and_the_files(
    two_runs: tuple[Path, dict[str, Written]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake, _ = two_runs
    report_command(lake, tmp_path / "report", None)

    printed = capsys.readouterr().out
    assert "trajectories" in printed and "audit: 0 online samples" in printed
    assert all(f"wrote {tmp_path / 'report' / name}" in printed.replace("\n", "") for name in PLOTS)


def test_the_wilson_interval_matches_hand_computed_bounds() -> None:
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not collapsed at 0 %
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_long_run_of_few_trajectories_per_version_is_pooled_into_bins_of_forty() -> None:
    versions, fours = np.arange(60), np.full(60, 4)

    width, ranges = version_bins(versions, fours)

    assert width == 10  # the narrowest width whose median bin holds 40
    assert ranges == [(0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59)]
    # three leftover versions (12 trajectories) join the last full bin instead of standing alone
    width, ranges = version_bins(np.arange(63), np.full(63, 4))
    assert width == 10 and ranges[-2:] == [(40, 49), (50, 62)]


def test_a_short_run_keeps_one_point_per_version() -> None:
    width, ranges = version_bins(np.arange(6), np.full(6, 8))

    assert width == 1
    assert ranges == [(v, v) for v in range(6)]


def test_pooled_bins_weight_the_version_and_carry_the_wilson_interval() -> None:
    # version 0: 1 success of 4; version 1: 6 of 6 -> 7 of 10 pooled; version 3 has no data
    versions, n = np.array([0.0, 1.0]), np.array([4.0, 6.0])
    sums = np.array([1.0, 6.0])

    (pooled,) = pool_versions([(0, 1), (2, 3)], versions, n, sums, sums)  # 0/1 rewards: Σr² = Σr

    assert (pooled.lo, pooled.hi, pooled.n) == (0, 1, 10)
    assert pooled.version == pytest.approx(0.6)  # (0 x 4 + 1 x 6) / 10
    assert pooled.mean == pytest.approx(0.7)
    assert pooled.std == pytest.approx(0.4830, abs=1e-4)  # sqrt((7 - 7 x 0.7) / 9)
    assert (pooled.low, pooled.high) == pytest.approx((0.3968, 0.8922), abs=1e-4)


@pytest.fixture
def long_run(tmp_path: Path) -> Path:
    """48 versions of 5 online trajectories (2 wins each up to version 24, then 4) and 10 expert
    demonstrations at version 0 in a separate run, 7 of them successful."""
    lake = tmp_path / "lake"
    writer = LakeWriter(lake, writer_id="test")
    rng = random.Random(5)
    for v in range(1, 49):
        for k in range(5):
            writer.add_scored(scored_at(rng, "ipa", v, k, reward=float(k < (2 if v <= 24 else 4))))
    for k in range(10):
        writer.add_scored(scored_at(rng, "seed", 0, k, reward=float(k < 7), source="expert"))
    writer.flush()
    return lake


def test_a_lake_of_many_small_versions_is_plotted_as_pooled_points_with_bands(long_run: Path) -> None:
    pooled = pooled_versions(long_run, None)

    assert pooled.widths == {"ipa": 8, "seed": 1}
    ipa = pooled.series[("ipa", "online")]
    assert [(b.lo, b.hi, b.n) for b in ipa] == [(1 + 8 * i, 8 + 8 * i, 40) for i in range(6)]
    assert [b.version for b in ipa] == pytest.approx([4.5 + 8 * i for i in range(6)])
    assert [b.mean for b in ipa] == pytest.approx([0.4] * 3 + [0.8] * 3)
    assert (ipa[0].low, ipa[0].high) == pytest.approx(wilson_interval(16, 40))
    (seed,) = pooled.series[("seed", "expert")]
    assert (seed.n, seed.low, seed.high) == (10, *wilson_interval(7, 10))

    ax = plot_success_by_version(long_run, None).axes[0]
    (line,) = [x for x in ax.get_lines() if x.get_label() == "ipa · online"]
    assert list(line.get_xdata()) == pytest.approx([b.version for b in ipa])
    assert list(line.get_ydata()) == pytest.approx([0.4] * 3 + [0.8] * 3)
    assert "bins of 8 versions" in ax.get_xlabel()
    (expert,) = [c for c in ax.containers if c.get_label() == "seed · expert"]  # a marker with error bar
    assert list(expert.lines[0].get_ydata()) == pytest.approx([0.7])
    reward_ax = plot_reward_by_version(long_run, None).axes[0]
    (rewards,) = [c for c in reward_ax.containers if c.get_label() == "ipa · online"]
    assert len(rewards.lines[0].get_xdata()) == 6


def test_the_short_two_run_lake_keeps_one_point_per_version(
    two_runs: tuple[Path, dict[str, Written]],
) -> None:
    lake, _ = two_runs
    pooled = pooled_versions(lake, None)

    assert pooled.widths == {"grpo": 1, "ipa": 1}
    ipa = pooled.series[("ipa", "online")]
    assert [b.version for b in ipa] == list(range(VERSIONS))
    assert [b.mean for b in ipa] == pytest.approx([w / PER_VERSION for w in [1, 2, 4, 5, 7, 8]])
    assert pooled.note() == ""


def test_the_eval_plot_rests_on_pass_at_k_by_version(two_runs: tuple[Path, dict[str, Written]]) -> None:
    lake, _ = two_runs
    points = eval_points(lake, "ipa")
    assert [p.version for p in points] == [0, 2, 4] and all(p.passk.k == 4 for p in points)
    # v0: only task t0 passes, once in 4 attempts: pass@1 = (1/4) / 4 tasks; pass@4 = 1 of 4 tasks
    assert points[0].pass1.value == pytest.approx(0.0625) and points[0].passk.value == pytest.approx(0.25)
    # v4: 13 of the 16 attempts pass, every task at least once
    assert points[2].pass1.value == pytest.approx(13 / 16) and points[2].passk.value == 1.0
