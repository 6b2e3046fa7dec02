"""`rollstream status` speaks of online samples only: replays are exempt from the staleness bound by
design, so a replayed sample trained 90 versions late must not read as a staleness violation."""

from __future__ import annotations

import random
from pathlib import Path

from consumers.lake import LakeWriter
from ops.status import lake_line
from tests.factories import STALENESS_BOUND, make_step, make_train, scored_at


def test_replayed_samples_are_counted_apart_from_online_staleness(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    rng = random.Random(3)
    for i in range(8):  # online: 6 trained at staleness 1, 2 dropped stale at staleness 5
        scored = scored_at(rng, "ipa", 4, i, reward=1.0)
        writer.add_scored(scored)
        stale = i >= 6
        writer.add_train(make_train(scored, 9 if stale else 5, fate="dropped" if stale else "trained"))
    for i in range(5):  # replays of old trajectories, trained far past the bound
        scored = scored_at(rng, "ipa", 0, 100 + i, reward=1.0)
        writer.add_train(make_train(scored, 90, source="replay"))
    writer.flush()

    line = lake_line(tmp_path / "lake", STALENESS_BOUND)

    assert "train log (online samples): 2 of 8 dropped (25.0% stale)" in line
    assert f"max trained staleness 1 (bound {STALENESS_BOUND})" in line
    assert "5 replayed samples (exempt from the bound)" in line
    assert "90" not in line
    assert "learner idle" not in line  # no step recorded its time


def test_learner_idle_is_the_waiting_share_of_its_training_loop(tmp_path: Path) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="test")
    for step, (wait, busy) in enumerate([(30.0, 10.0), (2.0, 18.0), (0.5, 19.5)], start=1):
        writer.add_train(make_step(step, wait_s=wait, busy_s=busy))
    writer.add_train(make_step(4))  # a record from before the learner timed its steps: not counted
    writer.flush()

    line = lake_line(tmp_path / "lake", STALENESS_BOUND)

    assert "learner idle 40.6% (waited 32 s of 80 s over 3 steps)" in line


def test_an_empty_lake_gives_a_line_not_a_crash(tmp_path: Path) -> None:
    line = lake_line(tmp_path / "nothing", STALENESS_BOUND)
    assert line.startswith("lake:")
