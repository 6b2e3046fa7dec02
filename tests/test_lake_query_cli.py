"""``rollstream query`` as a user runs it (a real process): csv and json go to stdout without --out,
parquet needs --out, a reader that stops early is no error."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from consumers.lake import LakeWriter, query
from tests.factories import fill, make_scored

SQL = "SELECT traj_id, reward, flags, num_chunks FROM trajectories ORDER BY traj_id"


def rollstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    writer = LakeWriter(tmp_path / "lake", writer_id="w1")
    fill(writer, random.Random(21), n=5)
    writer.flush()
    return tmp_path / "lake"


def test_csv_without_out_is_written_to_stdout(lake: Path) -> None:
    done = rollstream("query", "--lake", str(lake), "--format", "csv", SQL)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    got = list(csv.DictReader(io.StringIO(done.stdout)))
    want = query(lake, SQL).to_pylist()
    assert [r["traj_id"] for r in got] == [r["traj_id"] for r in want]
    assert [float(r["reward"]) for r in got] == [r["reward"] for r in want]
    assert [json.loads(r["flags"]) for r in got] == [r["flags"] for r in want]  # lists as JSON text


def test_json_without_out_is_json_lines_on_stdout(lake: Path) -> None:
    done = rollstream("query", "--lake", str(lake), "--format", "json", SQL)

    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert got == query(lake, SQL).to_pylist()


def test_parquet_without_out_is_one_clear_error(lake: Path) -> None:
    done = rollstream("query", "--lake", str(lake), "--format", "parquet", SQL)

    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    text = " ".join(done.stderr.split())
    assert "--format parquet writes a binary file: add --out PATH" in text


def test_with_out_the_file_is_written_and_stdout_says_so(lake: Path, tmp_path: Path) -> None:
    for fmt in ("csv", "json", "parquet"):
        target = tmp_path / f"result.{fmt}"
        done = rollstream("query", "--lake", str(lake), "--format", fmt, "--out", str(target), SQL)

        assert done.returncode == 0, done.stderr
        assert f"wrote 5 rows to {target}" in " ".join(done.stdout.split())
    assert pq.read_table(tmp_path / "result.parquet").num_rows == 5
    assert len((tmp_path / "result.json").read_text().splitlines()) == 5


def test_an_unwritable_out_is_one_clear_error(lake: Path, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "result.csv"
    done = rollstream("query", "--lake", str(lake), "--format", "csv", "--out", str(target), SQL)

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot write" in done.stderr and "No such file or directory" in done.stderr


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_reader_that_stops_after_one_line_is_no_error(tmp_path: Path, fmt: str) -> None:
    writer = LakeWriter(tmp_path / "lake", writer_id="w1")
    rng = random.Random(22)
    for _ in range(300):
        writer.add_scored(make_scored(rng, n_chunks=8))
    writer.flush()
    command = [sys.executable, "-m", "ops.cli", "query", "--lake", str(tmp_path / "lake")]
    process = subprocess.Popen(
        [*command, "--format", fmt, "SELECT * FROM chunks, range(20)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr

    assert first.startswith(b'{"traj_id":' if fmt == "json" else b'"traj_id",')
    assert stderr == ""
