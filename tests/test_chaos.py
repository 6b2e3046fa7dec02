"""The short chaos run (``ops/chaos.py``; ``just chaos`` runs the long one): real processes under
``rollstream up``, the rollout, reward, lake and learner workers SIGKILLed in turn, then the
producer stopped and the pipeline drained; the lake must show every task exactly once, no
duplicate in any view, no sample trained twice, no staleness violation, at least one episode
resumed mid-way, and no container after ``rollstream down``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.chaos import VICTIMS, run_chaos

pytestmark = [pytest.mark.docker, pytest.mark.slow]
KILLS = 6


def test_a_deployment_under_repeated_kill_9_loses_no_task_and_trains_nothing_twice(tmp_path: Path) -> None:
    audit = run_chaos(tmp_path / "state", kills=KILLS, interval_s=4.0, drain_s=150)
    assert audit.failures == [], audit
    assert sum(audit.kills.values()) == KILLS and all(audit.kills[v] >= 1 for v in VICTIMS)
    assert audit.tasks == audit.trajectories > 0 and audit.missing == audit.unknown == 0
    assert audit.resumed >= 1 and audit.trained_twice == 0 and audit.staleness_violations == 0
    assert audit.containers_after_down == 0
