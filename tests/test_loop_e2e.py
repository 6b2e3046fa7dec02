"""The whole loop, as `just up` runs it: real nats-server, real Docker sandboxes, real torch.

Runs `rollstream up` for a bounded time in a private state directory, then audits the lake.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.lake import query
from streams.server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]
ETA = 1


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    state = tmp_path_factory.mktemp("state")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "ops.cli",
        "up",
        "--duration",
        "75",
        "--quiet",
        "--set",
        f'state_dir="{state}"',
        "--set",
        f"nats.port={port}",
        "--set",
        "run=e2e",
        "--set",
        f'sandboxd.scope="e2e-{port}"',
        "--set",
        f"learner.max_staleness={ETA}",
        "--set",
        "learner.batch_size=4",
        "--set",
        "learner.failure_reward=-0.1",
        "--set",
        "learner.warm_start_steps=0",  # seeding + SFT take minutes; tests/test_warmstart_up.py covers them
    ]
    overrides = [a for a in args[args.index("--set") :] if a != "--set"]
    sets = [x for o in overrides for x in ("--set", o)]
    up = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        operate(sets, scaled)
        out, err = up.communicate(timeout=400)
    finally:
        if up.poll() is None:
            up.kill()
    return state, subprocess.CompletedProcess(args, up.returncode, out, err)


scaled: dict[str, str] = {}


def operate(sets: list[str], record: dict[str, str]) -> None:
    """While `up` runs: wait for the broker, `rollstream scale rollout=3`, then `rollstream status`."""
    cli = [sys.executable, "-m", "ops.cli"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if subprocess.run([*cli, "status", *sets], capture_output=True, text=True).returncode == 0:
            break
        time.sleep(2)
    record["scale"] = subprocess.run(
        [*cli, "scale", "rollout=3", *sets], capture_output=True, text=True
    ).stdout
    time.sleep(8)
    record["status"] = subprocess.run([*cli, "status", *sets], capture_output=True, text=True).stdout


def test_up_runs_and_stops_cleanly(loop_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    state, done = loop_run
    assert done.returncode == 0, done.stderr[-3000:]
    scope = (state / "config.toml").read_text().split('scope = "')[1].split('"')[0]
    leftover = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=rollstream.scope={scope}"], capture_output=True, text=True
    ).stdout.split()
    assert leftover == []
    assert not (state / "supervisor.pid").exists()


def test_trajectories_land_with_more_than_one_policy_version(
    loop_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    state, _ = loop_run
    rows = query(
        state / "lake", "SELECT count(*) AS n, count(DISTINCT policy_version) AS versions FROM trajectories"
    ).to_pylist()[0]
    assert rows["n"] >= 8
    assert rows["versions"] >= 2
    chunks = query(state / "lake", "SELECT count(*) AS n FROM chunks").to_pylist()[0]["n"]
    assert chunks >= rows["n"]


def test_no_sample_is_trained_past_the_staleness_bound(
    loop_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    state, _ = loop_run
    audit = query(
        state / "lake",
        "SELECT count(*) FILTER (staleness > max_staleness) AS violations, "
        "count(*) AS trained, max(max_staleness) AS bound FROM train_log WHERE fate = 'trained'",
    ).to_pylist()[0]
    assert audit["trained"] > 0
    assert audit["bound"] == ETA
    assert audit["violations"] == 0


def test_dropped_samples_are_recorded_with_their_reason(
    loop_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    state, _ = loop_run
    rows = query(
        state / "lake", "SELECT reason, staleness, max_staleness FROM train_log WHERE fate = 'dropped'"
    ).to_pylist()
    for row in rows:
        assert row["reason"], row
        if row["reason"].startswith("stale"):
            assert row["staleness"] > row["max_staleness"]
    # every scored trajectory the learner saw has exactly one fate per step it was taken in
    fates = query(state / "lake", "SELECT count(DISTINCT traj_id) AS n FROM train_log").to_pylist()[0]["n"]
    assert fates > 0


def test_scaling_rollout_to_three_shares_one_consumer_and_status_shows_it(
    loop_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    assert "rollout×3" in scaled["scale"], scaled
    row = next(line for line in scaled["status"].splitlines() if re.search(r"\brollout\b", line))
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    assert cells[:2] == ["rollout", "3"], cells  # one durable consumer, three processes on it
