"""The operator commands as a user runs them: lake compact, filter run, replay, resample."""

from __future__ import annotations

import random
from pathlib import Path

import typer
from typer.testing import CliRunner

from consumers.lake import LakeWriter, query
from ops.lake_cli import filter_app, lake_app, replay_command, resample_command
from streams.server import NatsServer
from tests.factories import fill, lake_trajectory, write_lake

app = typer.Typer()  # mounted as ops/cli.py mounts them
app.add_typer(lake_app, name="lake")
app.add_typer(filter_app, name="filter")
app.command("replay")(replay_command)
app.command("resample")(resample_command)
runner = CliRunner()


def seeded(root: Path, n: int = 3) -> Path:
    return write_lake(root, [lake_trajectory(i) for i in range(n)], writer_id="seed")


def test_lake_compact_reports_what_it_merged(tmp_path: Path) -> None:
    rng = random.Random(3)
    records = fill(LakeWriter(tmp_path, writer_id="w1"), rng)
    for writer_id in ("w1", "w2"):
        writer = LakeWriter(tmp_path, writer_id=writer_id)
        for scored in records:
            writer.add_scored(scored)
        writer.flush()

    result = runner.invoke(app, ["lake", "compact", "--lake", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert "trajectories: 4 duplicate rows removed" in result.output
    assert len(list(tmp_path.glob("trajectories/run=*/date=*/part-*.parquet"))) == 1


def test_filter_run_writes_verdicts_and_prints_the_counts(tmp_path: Path) -> None:
    seeded(tmp_path)
    result = runner.invoke(
        app, ["filter", "run", "--stage", "security", "--lake", str(tmp_path), "--run", "old"]
    )
    assert result.exit_code == 0, result.output
    assert "security: pass 3, flag 0, fail 0" in result.output
    assert query(tmp_path, "SELECT count(*) AS n FROM filters")["n"][0].as_py() == 3


def test_replay_publishes_to_a_running_broker_and_bad_sql_is_one_clear_error(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    lake = seeded(tmp_path / "lake")
    common = [
        "--lake",
        str(lake),
        "--set",
        f'nats.url="{nats_server.url}"',
        "--set",
        f'state_dir="{tmp_path}"',
    ]
    sql = "SELECT traj_id FROM trajectories"

    result = runner.invoke(app, ["replay", "--sql", sql, "--mode", "sft", "--run", "cli", *common])
    assert result.exit_code == 0, result.output
    assert "published 3 replay samples (sft) to rs.traj.scored.cli" in result.output

    bad = runner.invoke(app, ["replay", "--sql", "SELECT nope FROM trajectories", *common])
    assert bad.exit_code == 2 and "nope" in bad.output and "Traceback" not in bad.output
    short = runner.invoke(app, ["resample", "--sql", sql, "--from-chunk", "3", "--run", "cli", *common])
    assert short.exit_code == 0, short.output
    assert "published 0 task samples from 0 trajectories" in short.output
    assert "the lake has no task for it" in short.output
