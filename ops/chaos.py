"""Chaos run (``just chaos``): ``rollstream up`` under repeated SIGKILL, then an audit of the lake.

While a deployment runs in a private state directory, the rollout, reward, lake and learner
workers are SIGKILLed in turn (the supervisor restarts each), ``kills`` times in all, one every
``interval_s``. Then the producer is stopped (``rollstream scale producer=0``) and the pipeline
drains: every task it published must end exactly once in ``trajectories`` and in the learner's
account. The audit (``Audit``) checks: no task missing or doubled, no duplicate in any view, no
sample trained twice, no staleness violation, at least one episode resumed mid-way; and, after
``rollstream down``, no sandbox container left.

``python -m ops.chaos --kills 20 --interval 6`` prints the figures and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.lake import QueryError, open_lake, query
from consumers.lake.tables import DEDUPE
from streams.server import free_port

VICTIMS = ("rollout", "reward", "lake", "learner")
RUN = "chaos"


@dataclass
class Audit:
    """What the chaos run measured; ``failures`` lists the checks that did not hold."""

    kills: dict[str, int] = field(default_factory=dict)
    tasks: int = 0
    trajectories: int = 0
    missing: int = 0
    unknown: int = 0
    resumed: int = 0
    reattached: int = 0
    replayed: int = 0
    partial_left: int = 0
    trained: int = 0
    trained_twice: int = 0
    dropped: int = 0
    staleness_violations: int = 0
    view_duplicates: dict[str, int] = field(default_factory=dict)
    containers_before_down: int = 0
    containers_after_down: int = 0
    kill_phase_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def check(self) -> None:
        rules = {
            "a task is missing from trajectories": self.missing == 0,
            "a trajectory of no published task": self.unknown == 0,
            "no task was published": self.tasks > 0,
            "a sample was trained twice": self.trained_twice == 0,
            "a staleness violation": self.staleness_violations == 0,
            "no episode was resumed mid-way": self.resumed >= 1,
            "a view holds duplicates": not any(self.view_duplicates.values()),
            "a sandbox container outlived `rollstream down`": self.containers_after_down == 0,
        }
        self.failures = [name for name, ok in rules.items() if not ok]


class Deployment:
    """One ``rollstream up`` in a private state directory, driven through the CLI."""

    def __init__(self, state: Path, sets: list[str]) -> None:
        self.state = state
        port = free_port()
        self.scope = f"chaos-{port}"
        base = [f'state_dir="{state}"', f"nats.port={port}", f"run={RUN}", f'sandboxd.scope="{self.scope}"']
        self.sets = [x for item in [*base, *sets] for x in ("--set", item)]
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ops.cli", *args, *self.sets]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)

    def up(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "up.log", "wb") as out:
            cmd = [sys.executable, "-m", "ops.cli", "up", "--quiet", *self.sets]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def pid_of(self, name: str) -> int | None:
        try:
            info = json.loads((self.state / "processes.json").read_text())
        except (OSError, ValueError):
            return None
        return next((w["pid"] for w in info.get("workers", []) if w["name"] == name), None)

    def sql(self, sql: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = query(self.state / "lake", sql).to_pylist()
        return rows

    def lake(self) -> Callable[[str], list[dict[str, Any]]]:
        """A query function over one connection to the lake as it is now (for many queries)."""
        con = open_lake(self.state / "lake")
        return lambda sql: con.sql(sql).to_arrow_table().to_pylist()

    def containers(self) -> int:
        out = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=rollstream.scope={self.scope}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return len(out.stdout.split())

    def down(self) -> None:
        """``rollstream down``, reaping the ``up`` process meanwhile (``down`` waits for it to go,
        and an unreaped child never goes)."""
        cmd = [sys.executable, "-m", "ops.cli", "down", *self.sets]
        down = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        down.wait(timeout=180)


def wait_for(what: str, ok: Any, timeout_s: float, every_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"chaos: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(every_s)


def _alive(dep: Deployment, name: str) -> bool:
    pid = dep.pid_of(name)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _first_chunks(dep: Deployment, n: int) -> bool:
    """Episodes are under way: ``n`` chunks reached the lake (every victim is up by then)."""
    try:
        return bool(dep.sql("SELECT count(*) AS n FROM chunks_live")[0]["n"] >= n)
    except QueryError:
        return False


def kill_in_turn(dep: Deployment, kills: int, interval_s: float) -> dict[str, int]:
    """SIGKILL the victims in turn, ``kills`` times, one every ``interval_s`` (each once it is back)."""
    done = dict.fromkeys(VICTIMS, 0)
    for k in range(kills):
        name = VICTIMS[k % len(VICTIMS)]
        wait_for(f"{name} running", lambda name=name: _alive(dep, name), 120, 0.2)
        pid = dep.pid_of(name)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                done[name] += 1
            except ProcessLookupError:
                pass
        time.sleep(interval_s)
    return done


def _drained(dep: Deployment) -> bool:
    """Every published task has its trajectory and the learner's account of it."""
    try:
        [row] = dep.sql(
            "SELECT (SELECT count(*) FROM tasks) AS tasks, "
            "(SELECT count(*) FROM trajectories WHERE source = 'online') AS trajs, "
            "(SELECT count(DISTINCT traj_id) FROM train_log WHERE source = 'online') AS accounted"
        )
    except QueryError:
        return False
    return bool(row["tasks"]) and row["tasks"] == row["trajs"] == row["accounted"]


def audit_lake(dep: Deployment, audit: Audit) -> None:
    sql = dep.lake()
    ids = "run || ':' || task_id || ':' || sample_idx"
    [row] = sql(
        f"SELECT (SELECT count(*) FROM tasks) AS tasks, "
        f"(SELECT count(*) FROM trajectories WHERE source = 'online') AS trajs, "
        f"(SELECT count(*) FROM tasks WHERE {ids} NOT IN (SELECT traj_id FROM trajectories)) AS missing, "
        f"(SELECT count(*) FROM trajectories WHERE source = 'online' "
        f"AND traj_id NOT IN (SELECT {ids} FROM tasks)) AS unknown, "
        "(SELECT count(*) FROM trajectories WHERE coalesce(resumed, 0) > 0) AS resumed, "
        "(SELECT count(DISTINCT traj_id) FROM chunks_live WHERE traj_id NOT IN "
        "(SELECT traj_id FROM trajectories)) AS partial_left"
    )
    audit.tasks, audit.trajectories, audit.missing = row["tasks"], row["trajs"], row["missing"]
    audit.unknown, audit.resumed, audit.partial_left = row["unknown"], row["resumed"], row["partial_left"]
    [row] = sql(
        "SELECT count(*) FILTER (fate = 'trained') AS trained, "
        "count(*) FILTER (fate = 'dropped') AS dropped, "
        "count(*) FILTER (fate = 'trained' AND staleness > max_staleness) AS violations "
        "FROM train_log WHERE source = 'online'"
    )
    audit.trained, audit.dropped, audit.staleness_violations = (
        row["trained"],
        row["dropped"],
        row["violations"],
    )
    [row] = sql(
        "SELECT count(*) AS n FROM (SELECT traj_id FROM train_log WHERE source = 'online' "
        "AND fate = 'trained' GROUP BY traj_id HAVING count(*) > 1)"
    )
    audit.trained_twice = row["n"]
    [row] = sql(  # resumed in the sandbox it began in, or replayed into a fresh one
        "SELECT count(*) FILTER (n = 1) AS reattached, count(*) FILTER (n > 1) AS replayed FROM "
        "(SELECT traj_id, count(DISTINCT sandbox_id) AS n FROM chunks_live WHERE traj_id IN "
        "(SELECT traj_id FROM trajectories WHERE resumed > 0) GROUP BY traj_id)"
    )
    audit.reattached, audit.replayed = row["reattached"], row["replayed"]
    for table, (keys, _) in DEDUPE.items():
        [row] = sql(f"SELECT count(*) - count(DISTINCT ({keys})) AS d FROM {table}")
        audit.view_duplicates[table] = row["d"]


def run_chaos(
    state: Path,
    *,
    kills: int,
    interval_s: float,
    sets: tuple[str, ...] = (),
    drain_s: float = 300,
) -> Audit:
    """Start a deployment, kill in turn, stop the producer, drain, audit, ``down``; the figures."""
    dep, audit = Deployment(state, [*CHAOS_SETTINGS, *sets]), Audit()
    started = time.monotonic()
    dep.up()
    try:
        wait_for("the first durable chunks", lambda: _first_chunks(dep, 3), 300, 1.0)
        audit.kills = kill_in_turn(dep, kills, interval_s)
        audit.kill_phase_s = time.monotonic() - started
        dep.cli("scale", "producer=0")
        drain_from = time.monotonic()
        wait_for("the drain", lambda: _drained(dep), drain_s, 2.0)
        audit.drain_s = time.monotonic() - drain_from
        audit_lake(dep, audit)
        audit.containers_before_down = dep.containers()
    finally:
        dep.down()
    audit.containers_after_down = dep.containers()
    audit.total_s = time.monotonic() - started
    audit.check()
    return audit


# Small, fast episodes; heartbeats of 2 s (redelivery after 4 s, leases of 6 s); no warm start;
# two rollout processes, so that a killed one's episodes can be reattached by the other within the
# lease (a restarted process takes longer than that to start: its episodes are replayed). The
# producer's version-aware admission is off: with it, a killed learner or lake writer stops new work
# within a dozen samples, so the rollout kills that follow mostly find idle workers and no episode
# to resume; this run is about durability, and stale samples are dropped by the learner anyway.
CHAOS_SETTINGS = [
    "producer.admission=false",
    "processes.rollout=2",
    "learner.warm_start_steps=0",
    "learner.seed_episodes=0",
    "learner.batch_size=4",
    "learner.max_staleness=2",
    "rollout.heartbeat_s=2.0",
    "reward.heartbeat_s=2.0",
    "producer.max_inflight=8",
    "producer.levels=[2, 3]",
    "lake.flush_interval_s=1.0",
    "metrics.base_port=0",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kills", type=int, default=20, help="SIGKILLs in all (rollout, reward, lake, learner in turn)"
    )
    parser.add_argument("--interval", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds the drain may take at most")
    parser.add_argument("--state", type=Path, default=None, help="state directory (default: a temporary one)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra key=value settings")
    args = parser.parse_args()
    state = args.state or Path(tempfile.mkdtemp(prefix="rollstream-chaos-")) / "state"
    audit = run_chaos(
        state, kills=args.kills, interval_s=args.interval, sets=tuple(args.sets), drain_s=args.drain
    )
    for name, value in vars(audit).items():
        sys.stdout.write(f"{name:24} {value}\n")
    sys.stdout.write(f"state (logs, lake)       {state}\n")
    sys.exit(1 if audit.failures else 0)


if __name__ == "__main__":
    main()
