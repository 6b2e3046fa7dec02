"""The report never crashes on a real lake: many drop reasons, empty tables, runs without a learner,
partial version bins, parts written before a column existed. Every lake is written by LakeWriter."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.colors import to_rgb

from consumers.lake import LakeWriter
from ops.report import PLOTS, plot_staleness, pooled_versions, write_report
from ops.report.plots import MAX_DROP_KINDS, drop_colours
from tests.factories import STALENESS_BOUND, make_task, make_train, scored_at

REASONS = 30  # more drop reasons than any fixed palette holds


def legend_labels(fig) -> list[str]:  # type: ignore[no-untyped-def]
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


@pytest.fixture
def many_reasons(tmp_path: Path) -> Path:
    """One run whose learner dropped online samples for 30 different reasons (reason k k+1 times)."""
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(11)
    for k in range(REASONS):
        for i in range(k + 1):
            scored = scored_at(rng, "ipa", k % 4, i, reward=float(i % 2))
            writer.add_scored(scored)
            writer.add_train(make_train(scored, k % 4 + i % 5, fate="dropped", reason=f"reason-{k:02d}"))
    for i in range(20):
        scored = scored_at(rng, "ipa", 3, i, reward=1.0)
        writer.add_scored(scored)
        writer.add_train(make_train(scored, 4))
    writer.flush()
    return tmp_path / "lake"


def test_thirty_drop_reasons_are_drawn_with_the_rarest_pooled(many_reasons: Path, tmp_path: Path) -> None:
    result = write_report(many_reasons, tmp_path / "report")

    assert "staleness.png" not in result.skipped
    assert [p.name for p in result.plots] == list(PLOTS)[:4]  # no train_steps: no loss plot
    fig = plot_staleness(many_reasons, None)
    labels = [label for label in legend_labels(fig) if not label.startswith("bound")]
    kept = [f"dropped: reason-{k:02d}" for k in range(REASONS - 1, REASONS - 1 - MAX_DROP_KINDS, -1)]
    assert labels == ["trained", *sorted(kept), f"dropped: other ({REASONS - MAX_DROP_KINDS} reasons)"]
    ax = fig.axes[0]
    drawn = sum(p.get_height() for p in ax.patches)
    assert drawn == sum(k + 1 for k in range(REASONS)) + 20  # every sample is in some bar
    colours = {to_rgb(c.patches[0].get_facecolor()) for c in ax.containers}
    assert len(colours) == len(ax.containers) == MAX_DROP_KINDS + 2


def test_drop_colours_are_distinct_for_any_number_of_reasons() -> None:
    for n in (0, 1, 8, 9, 40):
        colours = drop_colours(n)
        assert len(colours) == len(set(colours)) == n


def test_a_lake_of_tasks_only_is_summarised_and_every_plot_skipped(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    writer.add_task(make_task("ipa"))
    writer.flush()

    result = write_report(tmp_path / "lake", tmp_path / "report")

    assert result.plots == []
    assert set(result.skipped) == set(PLOTS)
    assert "trajectories  none" in result.summary
    assert "train_log     none" in result.summary and "steps         none" in result.summary
    assert "could not draw" not in result.summary


def test_invalid_trajectories_and_replay_only_training_skip_the_plots_they_need(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(12)
    for v in range(3):
        scored = scored_at(rng, "ipa", v, 0, reward=0.0, valid=False)
        writer.add_scored(scored)
        writer.add_train(make_train(scored, v + 1, source="replay"))
    writer.flush()

    result = write_report(tmp_path / "lake", tmp_path / "report")

    assert result.skipped["success_by_version.png"] == "no valid trajectories"
    assert result.skipped["reward_by_version.png"] == "no valid trajectories"
    assert result.skipped["staleness.png"] == "no online train_log rows"
    assert "staleness     no online samples" in result.summary
    assert [p.name for p in result.plots] == ["throughput.png"]


def test_a_run_without_a_learner_next_to_one_with_a_learner(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(13)
    for v in range(4):
        for k in range(3):
            with_learner = scored_at(rng, "ipa", v, k, reward=float(k == 0))
            writer.add_scored(with_learner)
            writer.add_train(make_train(with_learner, v + 1))
            writer.add_scored(scored_at(rng, "eval", v, k, reward=1.0))  # rollouts only
    writer.flush()

    result = write_report(tmp_path / "lake", tmp_path / "report")
    alone = write_report(tmp_path / "lake", tmp_path / "eval", run="eval")

    assert [p.name for p in result.plots] == list(PLOTS)[:4]  # no train_steps: no loss plot
    assert "eval" in line_of(result.summary, "success", "eval")
    assert [p.name for p in alone.plots] == [PLOTS[0], PLOTS[1], "throughput.png"]
    assert "train_log     none" in alone.summary


def line_of(summary: str, key: str, contains: str) -> str:
    lines = summary.splitlines()
    start = next(i for i, text in enumerate(lines) if text.startswith(key))
    return next(text for text in lines[start:] if contains in text)


def test_partial_and_sparse_version_bins_keep_every_trajectory(tmp_path: Path) -> None:
    """61 versions with gaps and uneven counts: bins of several versions, a short last bin."""
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(14)
    total = 0
    for v in range(61):
        n = 0 if v % 7 == 3 else 1 + v % 5  # some versions have no trajectory at all
        for k in range(n):
            writer.add_scored(scored_at(rng, "ipa", v, k, reward=float(k % 2 == 0)))
        total += n
    writer.flush()

    pooled = pooled_versions(tmp_path / "lake", None)
    result = write_report(tmp_path / "lake", tmp_path / "report")

    bins = pooled.runs["ipa"]
    assert pooled.widths["ipa"] > 1
    assert sum(b.n for b in bins) == total
    assert all(a.hi < b.lo for a, b in itertools.pairwise(bins))  # disjoint, in order
    assert bins[-1].hi == 60
    assert {"success_by_version.png", "reward_by_version.png"} <= {p.name for p in result.plots}


def test_parts_written_before_a_column_existed_still_report(tmp_path: Path) -> None:
    """An older writer had no ``source`` or ``max_staleness``: the views read them as NULL."""
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(15)
    for v in range(3):
        scored = scored_at(rng, "ipa", v, 0, reward=1.0)
        writer.add_scored(scored)
        writer.add_train(make_train(scored, v + 1))
    writer.flush()
    for table, column in (("trajectories", "source"), ("train_log", "max_staleness")):
        for part in (tmp_path / "lake" / table).glob("**/*.parquet"):
            pq.write_table(pq.read_table(part).drop_columns([column]), part)

    result = write_report(tmp_path / "lake", tmp_path / "report")

    assert {"success_by_version.png", "staleness.png"} <= {p.name for p in result.plots}
    assert "could not draw" not in result.summary


def test_just_report_on_thirty_drop_reasons_exits_cleanly(many_reasons: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "report", "--lake", str(many_reasons), "-o", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "staleness.png").stat().st_size > 10_000
    assert "Traceback" not in done.stderr


def test_staleness_bars_sit_at_their_staleness(many_reasons: Path) -> None:
    ax = plot_staleness(many_reasons, None).axes[0]
    heights: dict[int, float] = {}
    for container in ax.containers:
        for patch in container.patches:
            x = round(patch.get_x() + patch.get_width() / 2)
            heights[x] = heights.get(x, 0.0) + patch.get_height()
    assert {x for x, h in heights.items() if h} == set(range(5))  # dropped at staleness i % 5
    assert ax.get_lines()[0].get_xdata()[0] == pytest.approx(STALENESS_BOUND + 0.5)
    assert np.isclose(sum(heights.values()), sum(k + 1 for k in range(REASONS)) + 20)
