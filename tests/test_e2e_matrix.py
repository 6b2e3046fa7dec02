"""Every documented path under the real `rollstream up`: supervisor, per-role credentials, sandboxd,
NATS, torch. One deployment per producer source; the builtin one also serves the proxy, `replay`,
`resample`, `scale`, `status` and `report`. Each cell asserts records in its lake and no permission
violation in any log (worker or broker). New sources, engines and commands join the matrix here.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from consumers.lake import QueryError, query
from streams.server import free_port
from tests.task_fixtures import TASKS, make_swe_fixture

pytestmark = [pytest.mark.docker, pytest.mark.slow]
ETA = 1
CLI = [sys.executable, "-m", "ops.cli"]
VIOLATION = re.compile(r"permissions? violation|(publish|subscription) violation", re.IGNORECASE)
JSONL_TASK = {
    "task_id": "apple",
    "family": "shell",
    "instruction": "Write the word apple to answer.txt",
    "setup": ["true"],
    "verify": ['test "$(cat answer.txt)" = "apple"'],
    "group_size": 2,
}


@dataclass
class Deployment:
    """One `rollstream up` in a private state directory, driven by the CLI as a user would."""

    state: Path
    run: str
    sets: list[str]
    proc: subprocess.Popen[str] | None = None
    done: subprocess.CompletedProcess[str] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, state: Path, policy: Path, run: str, *overrides: str) -> Deployment:
        """`up` in ``state``, with the session's tiny policy as its base (preflight would make the
        same one, ~15 s per deployment)."""
        shutil.copytree(policy, state / "policy" / "base")
        port = free_port()
        settings = [
            f'state_dir="{state}"',
            f"nats.port={port}",
            f"run={run}",
            f'sandboxd.scope="matrix-{port}"',
            "metrics.base_port=0",  # the machine is shared: no fixed ports
            "learner.warm_start_steps=0",  # tests/test_warmstart_up.py covers the warm start
            "learner.batch_size=4",
            "lake.flush_interval_s=1.0",
            *overrides,
        ]
        sets = [x for s in settings for x in ("--set", s)]
        dep = cls(state, run, sets)
        dep.proc = subprocess.Popen(
            [*CLI, "up", "--quiet", "--duration", "600", *sets],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return dep

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, *self.sets], capture_output=True, text=True, timeout=timeout)

    def wait_broker(self, timeout_s: float = 240) -> None:
        """Until the supervisor has created the topology and started workers (processes.json) and
        `rollstream status` answers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.stop().stderr[-3000:]
            if (self.state / "processes.json").exists() and self.cli("status", timeout=60).returncode == 0:
                return
            time.sleep(1)
        raise AssertionError("the deployment's broker never answered `rollstream status`")

    def count(self, sql: str) -> int:
        if not (self.state / "lake" / "trajectories").exists():
            return 0
        try:
            return int(query(self.state / "lake", sql).to_pylist()[0]["n"])
        except QueryError:
            return 0

    def wait_rows(self, sql: str, n: int, timeout_s: float) -> int:
        """Poll the lake until ``sql`` (``SELECT count(*) AS n ...``) reaches ``n``."""
        deadline = time.monotonic() + timeout_s
        got = 0
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.stop().stderr[-3000:]
            got = self.count(sql)
            if got >= n:
                return got
            time.sleep(1)
        return got

    def stop(self) -> subprocess.CompletedProcess[str]:
        """SIGTERM, as `just down` does; the supervisor stops workers, broker and sandboxes."""
        if self.done is None:
            assert self.proc is not None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                out, err = self.proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
            self.done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self.done

    def violations(self) -> list[str]:
        """Lines of any log (workers, supervisor, broker) that report a permission violation."""
        found = []
        for log in sorted((self.state / "logs").glob("*.log")):
            found += [
                f"{log.name}: {line[:300]}" for line in log.read_text().splitlines() if VIOLATION.search(line)
            ]
        return found


def assert_clean(dep: Deployment) -> None:
    done = dep.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert dep.violations() == []
    assert not VIOLATION.search(done.stderr), done.stderr[-3000:]  # nor in up's last line (ops.health)
    report = dep.cli("report", "--out", str(dep.state / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (dep.state / "report" / "summary.txt").exists()


# -- the builtin source, with the proxy, replay, resample, scale, status and report ---------------


def proxy_session(url: str) -> int:
    """One OpenAI-style chat request through the proxy, then the session finished with a reward."""
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(f"{url}/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        body = {
            "model": "rollstream",
            "messages": [{"role": "user", "content": "Write the word apple to answer.txt."}],
            "max_tokens": 12,
            "user": "matrix",
        }
        reply = http.post(f"{url}/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        done = http.post(f"{url}/rollstream/sessions/matrix/finish", json={"reward": 1.0})
        return done.status_code


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Path) -> Iterator[Deployment]:
    proxy_port = free_port()
    dep = Deployment.start(
        tmp_path_factory.mktemp("builtin"),
        tiny_policy,
        "mbuiltin",
        "processes.proxy=1",
        f"proxy.port={proxy_port}",
        "proxy.max_new_tokens=12",
        # a small warm start, so the lake holds expert episodes with well-formed tool calls to resample
        "learner.warm_start_steps=4",
        "learner.seed_episodes=8",
        "learner.warm_start_batch=4",
        f"learner.max_staleness={ETA}",
        "learner.failure_reward=-0.1",
    )
    try:
        dep.wait_broker()
        dep.notes["proxy"] = str(proxy_session(f"http://127.0.0.1:{proxy_port}/v1"))
        dep.notes["scale"] = dep.cli("scale", "reward=2").stdout
        online = "SELECT count(*) AS n FROM trajectories WHERE source = 'online'"
        dep.wait_rows(online, 8, 180)
        versions = "SELECT count(DISTINCT policy_version) AS n FROM trajectories WHERE source = 'online'"
        dep.wait_rows(versions, 2, 90)
        chosen = "SELECT traj_id FROM trajectories WHERE source = 'online' AND num_chunks >= 1 LIMIT 2"
        replay = dep.cli("replay", "--sql", chosen, "--mode", "sft")
        dep.notes["replay"] = replay.stdout + replay.stderr[-2000:]
        expert = (
            "SELECT traj_id FROM trajectories "
            "WHERE source = 'expert' AND reward = 1 AND num_chunks >= 2 LIMIT 2"
        )
        resample = dep.cli("resample", "--sql", expert, "--from-chunk", "1")
        dep.notes["resample"] = resample.stdout + resample.stderr[-2000:]
        dep.wait_rows("SELECT count(*) AS n FROM train_log WHERE source = 'replay'", 1, 90)
        dep.wait_rows("SELECT count(*) AS n FROM trajectories WHERE source = 'proxy'", 1, 30)
        dep.notes["status"] = dep.cli("status").stdout
        yield dep
    finally:
        dep.stop()


def test_online_trajectories_land_with_more_than_one_policy_version(builtin: Deployment) -> None:
    online = "FROM trajectories WHERE source = 'online'"
    n = builtin.count(f"SELECT count(*) AS n {online}")
    assert n >= 8
    assert builtin.count(f"SELECT count(DISTINCT policy_version) AS n {online}") >= 2
    assert builtin.count(f"SELECT count(*) AS n FROM chunks WHERE traj_id IN (SELECT traj_id {online})") >= n


def test_no_online_sample_is_trained_past_the_staleness_bound(builtin: Deployment) -> None:
    audit = query(
        builtin.state / "lake",
        "SELECT count(*) FILTER (staleness > max_staleness) AS violations, count(*) AS trained, "
        "max(max_staleness) AS bound FROM train_log WHERE fate = 'trained' AND source = 'online'",
    ).to_pylist()[0]
    assert audit["trained"] > 0
    assert audit["bound"] == ETA
    assert audit["violations"] == 0


def test_dropped_samples_are_recorded_with_their_reason(builtin: Deployment) -> None:
    rows = query(
        builtin.state / "lake",
        "SELECT reason, staleness, max_staleness FROM train_log WHERE fate = 'dropped'",
    ).to_pylist()
    for row in rows:
        assert row["reason"], row
        if row["reason"].startswith("stale"):
            assert row["staleness"] > row["max_staleness"]


def test_one_request_through_the_proxy_lands_as_a_proxy_trajectory(builtin: Deployment) -> None:
    assert builtin.notes["proxy"] == "200"
    assert (
        builtin.count("SELECT count(*) AS n FROM trajectories WHERE source = 'proxy' AND reward = 1.0") == 1
    )


def test_replay_against_the_running_deployment_reaches_the_learner(builtin: Deployment) -> None:
    assert "published 2 replay samples (sft)" in builtin.notes["replay"], builtin.notes
    assert builtin.count("SELECT count(*) AS n FROM train_log WHERE source = 'replay'") >= 1


def test_resample_against_the_running_deployment_publishes_tasks(builtin: Deployment) -> None:
    assert re.search(r"published [1-9]\d* task samples from 2 trajectories", builtin.notes["resample"]), (
        builtin.notes
    )


def test_scale_reward_to_two_and_status_shows_it(builtin: Deployment) -> None:
    assert "reward×2" in builtin.notes["scale"], builtin.notes
    row = next(line for line in builtin.notes["status"].splitlines() if re.search(r"\breward\b", line))
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    assert cells[:2] == ["reward", "2"], cells
    assert "lake:" in builtin.notes["status"] and "trajectories" in builtin.notes["status"]


def test_builtin_deployment_stops_cleanly_reports_and_has_no_permission_violation(
    builtin: Deployment,
) -> None:
    assert_clean(builtin)
    assert not (builtin.state / "supervisor.pid").exists()
    scope = json.dumps(builtin.sets)  # the scope is in the settings: no container of it is left
    name = re.search(r"matrix-\d+", scope)
    assert name is not None
    leftover = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=rollstream.scope={name.group(0)}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert leftover == []


# -- the other producer sources: one short deployment each -----------------------------------------


def source_cell(tmp: Path, policy: Path, source: str, *overrides: str, family: str, n: int = 2) -> Deployment:
    dep = Deployment.start(tmp, policy, f"m{source}", f'producer.source="{source}"', *overrides)
    try:
        dep.wait_broker()
        sql = f"SELECT count(*) AS n FROM trajectories WHERE family LIKE '{family}%'"
        dep.notes["rows"] = str(dep.wait_rows(sql, n, 240))
    finally:
        dep.stop()
    return dep


def test_jsonl_source_under_up(tmp_path: Path, tiny_policy: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(JSONL_TASK) + "\n")
    dep = source_cell(tmp_path / "state", tiny_policy, "jsonl", f'producer.path="{tasks}"', family="shell")
    assert int(dep.notes["rows"]) >= 2
    assert_clean(dep)


def test_gem_source_under_up(tmp_path: Path, tiny_policy: Path, gem_image: str) -> None:
    dep = source_cell(
        tmp_path / "state",
        tiny_policy,
        "gem",
        'producer.env_id="game:GuessTheNumber-v0-easy"',
        "rollout.harness.max_total_tokens=1800",
        family="gem:game:GuessTheNumber-v0-easy",
    )
    assert int(dep.notes["rows"]) >= 2
    assert_clean(dep)


def test_harbor_source_under_up(tmp_path: Path, tiny_policy: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("hello-file", "sort-unique"):
        (folder / name).symlink_to((TASKS / "harbor" / name).resolve())
    dep = source_cell(tmp_path / "state", tiny_policy, "harbor", f'producer.path="{folder}"', family="harbor")
    assert int(dep.notes["rows"]) >= 2
    assert_clean(dep)


def test_swe_source_under_up(tmp_path: Path, tiny_policy: Path) -> None:
    instances = make_swe_fixture(tmp_path / "swe")
    dep = source_cell(tmp_path / "state", tiny_policy, "swe", f'producer.path="{instances}"', family="swe")
    assert int(dep.notes["rows"]) >= 2
    assert_clean(dep)
