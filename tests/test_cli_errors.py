"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def rollstream(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    text = " ".join(done.stderr.split())
    for needle in needles:
        assert needle in text, text


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "rollstream.toml"
    cfg.write_text("[learner]\nmax_stalenes = 2\n")
    assert_one_clear_line(rollstream("status", "--config", str(cfg)), "unknown key `learner.max_stalenes`")


def test_out_of_range_value_names_the_key() -> None:
    assert_one_clear_line(
        rollstream("status", "--set", "learner.max_staleness=-1"), "learner.max_staleness", ">= 0"
    )


def test_invalid_sql_gets_duckdbs_message(tmp_path: Path) -> None:
    done = rollstream("query", "--lake", str(tmp_path), "SELEC nonsense FROM trajectories")
    assert_one_clear_line(done, "syntax error")


def test_unknown_table_gets_duckdbs_message(tmp_path: Path) -> None:
    assert_one_clear_line(rollstream("query", "--lake", str(tmp_path), "SELECT * FROM nope"), "nope")


def test_missing_docker_engine_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    done = rollstream("up", "--set", f'state_dir="{tmp_path}"', env=env)
    assert_one_clear_line(done, "no Docker engine answers")


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = rollstream("up", "--set", f'state_dir="{tmp_path}"', "--set", f"nats.port={port}")
    assert_one_clear_line(done, f"port {port} is already in use")


def test_status_without_a_broker_says_so(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = rollstream("status", "--set", f"nats.port={port}", "--set", f'state_dir="{tmp_path}"')
    assert_one_clear_line(done, "no broker answers")
