"""The cell "engine = openai via rollstream serve" as `just up` runs it: the supervisor starts a
`rollstream serve` process; rollout workers generate through it over HTTP; the reward group
scores, the learner trains and publishes; the rollout side writes each new version to the shared
weights directory and the server loads it (its log says so), and trajectories carry the versions
the server reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.lake import query
from streams.server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    state = tmp_path_factory.mktemp("state")
    port, serve_port = free_port(), free_port()
    sets = [
        f'state_dir="{state}"',
        f"nats.port={port}",
        "run=served",
        f'sandboxd.scope="served-{port}"',
        "processes.serve=1",
        f"serve.port={serve_port}",
        'rollout.engine="openai"',
        "learner.max_staleness=1",
        "learner.batch_size=4",
        "learner.warm_start_steps=0",
        "metrics.base_port=0",
    ]
    args = [sys.executable, "-m", "ops.cli", "up", "--duration", "70", "--quiet"]
    args += [x for s in sets for x in ("--set", s)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=400)
    return state, done


def test_the_supervisor_runs_a_serve_process_and_stops_it(
    served_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    state, done = served_run
    assert done.returncode == 0, done.stderr[-3000:]
    log = (state / "logs" / "serve-0.log").read_text()
    assert "serve_started" in log and "serve_stopped" in log


def test_the_server_loads_new_versions_and_trajectories_carry_them(
    served_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    state, _ = served_run
    loaded = [
        json.loads(line)["policy_version"]
        for line in (state / "logs" / "serve-0.log").read_text().splitlines()
        if '"serve_weights_loaded"' in line
    ]
    assert loaded and loaded == sorted(loaded) and loaded[-1] >= 1
    assert any((state / "weights" / "served").glob("v*/model.safetensors"))
    rows = query(
        state / "lake",
        "SELECT count(*) AS n, count(DISTINCT policy_version) AS versions, max(policy_version) AS top "
        "FROM trajectories",
    ).to_pylist()[0]
    assert rows["n"] >= 4 and rows["versions"] >= 2
    assert rows["top"] <= loaded[-1]  # no trajectory claims a version the server never held
    audit = query(
        state / "lake",
        "SELECT count(*) FILTER (staleness > max_staleness) AS violations, count(*) AS trained "
        "FROM train_log WHERE fate = 'trained'",
    ).to_pylist()[0]
    assert audit["trained"] > 0 and audit["violations"] == 0
