"""Failures surface: a real worker that hits a real permission violation under `rollstream up` shows
it in `rollstream status` while it runs, exits with that message after a few repeats (the
supervisor restarts it and counts), and `up` names it in one line when it stops."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from ops.config import load_config
from ops.health import FATAL_REPEATS, ErrorTally, error_key, publish
from ops.progress import Progress
from ops.security import write_server_config
from ops.status import problems
from ops.supervisor import Supervisor
from schemas.health import health_decoder
from streams.permissions import USES
from streams.server import NatsServer, free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]
CLI = [sys.executable, "-m", "ops.cli"]
RUN = "healthy"
DENIED = re.compile(
    r"rollout: permissions violation for \$JS\.API\.CONSUMER\.MSG\.NEXT\.RS_TASKS\.rollout-healthy \(×\d+\)",
    re.IGNORECASE,  # nats-py lower-cases the server's error text
)


def test_a_broker_permission_violation_is_one_fatal_key_however_often_it_comes() -> None:
    tally = ErrorTally()
    event = {"event": "nats_error", "error": 'nats: permissions violation for publish to "rs.sandbox.create"'}
    for _ in range(FATAL_REPEATS):
        tally.observe(None, "error", dict(event))
    tally.observe(
        None, "warning", {"event": "handler_failed", "error": "no reply on rs.sandbox.ab12cd34ef.exec in 60s"}
    )
    assert tally.counts["permissions violation for rs.sandbox.create"] == FATAL_REPEATS
    assert tally.failing == f"permissions violation for rs.sandbox.create (×{FATAL_REPEATS})"
    assert error_key({"event": "x", "error": "timeout after 12.5 s"}) == ("x: timeout after N s", False)


def test_a_worker_denied_its_consumer_shows_up_in_status_exits_and_is_summarised(
    tmp_path: Path, tiny_policy: Path
) -> None:
    # The rollout role without the right to pull from its own consumer: every fetch is denied.
    rollout = USES["rollout"]
    narrowed = {
        **USES,
        "rollout": replace(rollout, request=tuple(s for s in rollout.request if "MSG.NEXT" not in s)),
    }
    creds, conf, state = tmp_path / "creds", tmp_path / "nats.conf", tmp_path / "state"
    write_server_config(conf, creds, run=RUN, table=narrowed)
    shutil.copytree(tiny_policy, state / "policy" / "base")  # preflight would make the same one
    port = free_port()
    server = NatsServer(
        store_dir=tmp_path / "js", port=port, config_file=conf, log_file=tmp_path / "nats.log"
    )
    server.start()
    settings = [
        f'state_dir="{state}"',
        f'nats.url="nats://127.0.0.1:{port}"',
        f'nats.creds_dir="{creds}"',
        f"run={RUN}",
        "metrics.base_port=0",
        *(f"processes.{name}=0" for name in ("sandboxd", "lake", "learner", "reward", "producer")),
    ]
    sets = [x for s in settings for x in ("--set", s)]
    up = subprocess.Popen(
        [*CLI, "up", "--quiet", "--duration", "300", *sets], stderr=subprocess.PIPE, text=True
    )
    try:
        status = ""
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not ("restarted" in status and DENIED.search(status)):
            time.sleep(2)
            status = subprocess.run(
                [*CLI, "status", *sets], capture_output=True, text=True, timeout=60
            ).stdout
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
        server.stop()
    assert DENIED.search(status), status
    assert "restarted" in status, status
    log = (state / "logs" / "rollout-0.log").read_text()
    exit_line = r"error: rollout: permissions violation for \S+MSG\.NEXT\S+ \(×3\)"
    assert re.search(exit_line, log, re.IGNORECASE), log[-2000:]
    summary = [line for line in err.splitlines() if line.startswith("errors:")]
    assert len(summary) == 1 and DENIED.search(summary[0]) and "restarted" in summary[0], err[-2000:]


def test_an_exception_logged_from_a_task_group_is_counted_by_what_went_wrong() -> None:
    tally = ErrorTally()
    for _ in range(2):
        try:
            raise ExceptionGroup("unhandled errors in a TaskGroup", [TimeoutError("weights v12 not fetched")])
        except ExceptionGroup:
            tally.observe(None, "exception", {"event": "handler_failed", "exc_info": True})
    assert tally.counts == {"handler_failed: TimeoutError: weights vN not fetched": 2}
    assert tally.failing == ""  # transient: shown, not fatal


async def test_a_worker_that_crashes_sends_its_last_report_with_the_cause(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    reports = await nc.subscribe("rs.ops.health.crashing")
    settings = [
        f'state_dir="{tmp_path}"',
        "run=crashing",
        'producer.source="jsonl"',
        f'producer.path="{tmp_path}/none.jsonl"',
    ]
    sets = [x for s in settings for x in ("--set", s)]
    worker = await anyio.run_process(
        [*CLI, "worker", "producer", "--nats", nats_server.url, *sets], check=False
    )
    assert worker.returncode != 0
    health = health_decoder.decode((await reports.next_msg(timeout=5)).data)
    assert health.worker == "producer"
    assert [key for key in health.errors if key.startswith("worker_crashed: TaskFileError")], health.errors


async def test_the_live_view_and_status_show_a_report_as_soon_as_it_arrives(nc: NATS, tmp_path: Path) -> None:
    cfg = load_config(None, [f'state_dir="{tmp_path / "state"}"', f"run={RUN}"])
    cfg.state.mkdir(parents=True)
    supervisor = Supervisor(cfg)
    await supervisor.health.subscribe(nc, RUN)
    tally = ErrorTally()
    for _ in range(37):
        tally.record("permissions violation for rs.sandbox.create")
    await publish(nc, RUN, "producer", tally)
    expected = "producer: permissions violation for rs.sandbox.create (×37)"
    progress = Progress(cfg, nc, supervisor)
    for _ in range(100):  # the report crosses the broker: within 5 s, in practice milliseconds
        if expected in progress.line():
            break
        await anyio.sleep(0.05)
    assert f"failing: {expected}" in progress.line()
    assert problems(cfg) == [expected]  # what `rollstream status` prints, from <state>/health.json
