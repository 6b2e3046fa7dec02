"""A deployment spread over three "hosts" on loopback: a secured 3-server NATS cluster, per-role
credentials copied per host, real worker processes (`rollstream worker ...`), real Docker sandboxes
and real torch. One server is SIGKILLed mid-run and the loop goes on. See docs/multihost.md."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from consumers.lake import QueryError, query
from ops.cluster import Cluster, Member, cluster_config, write_host_configs
from ops.config import load_config, to_toml
from ops.security import ROLES, authorization_block, ensure_credentials
from streams.server import nats_server_binary
from streams.topology import TASKS, TRAJ
from tests.factories import make_tiny_policy

RUN = "mh"
REPO = Path(__file__).parents[1]
# What each "host" runs; the learner and the lake writer share host 0 (and its disk).
HOSTS: list[tuple[str, ...]] = [
    ("sandboxd", "learner", "lake"),
    ("sandboxd", "producer", "rollout"),
    ("sandboxd", "reward"),
]
KILLED = 1  # the server of the rollout host: its producer, rollout and sandboxd must fail over


# -- configuration only (no processes) -------------------------------------------------------------


def test_every_server_of_a_secured_cluster_carries_the_same_users_and_credentialed_routes(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path / "nats", 3, creds_dir=tmp_path / "creds", run=RUN)
    confs = [(tmp_path / "nats" / m.name / "nats.conf") for m in cluster.members]
    texts = [c.read_text() for c in confs]
    creds = ensure_credentials(tmp_path / "creds")
    block = authorization_block(creds, run=RUN)
    route = json.loads((tmp_path / "creds" / "route.json").read_text())
    for conf, text, me in zip(confs, texts, cluster.members, strict=True):
        assert text.endswith(block)  # identical users and grants on every server
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it holds passwords
        assert f'authorization {{ user: "route", password: "{route["password"]}"' in text
        for other in cluster.members:
            url = f"nats-route://route:{route['password']}@127.0.0.1:{other.route_port}"
            assert (url in text) == (other is not me)
    assert "no_auth_user" not in texts[0]
    assert {json.loads((tmp_path / "creds" / f"{r}.json").read_text())["user"] for r in ROLES} == set(ROLES)


def test_configure_writes_one_complete_config_per_host_that_nats_server_accepts(tmp_path: Path) -> None:
    hosts = ["node-a.example", "node-b.example", "node-c.example"]
    paths = write_host_configs(tmp_path / "out", hosts, tmp_path / "creds", store_dir=str(tmp_path / "js"))
    assert [p.parent.name for p in paths] == ["rs-0", "rs-1", "rs-2"]
    text = paths[2].read_text()
    assert 'listen: "0.0.0.0:4222"' in text and 'listen: "0.0.0.0:6222"' in text
    assert "@node-a.example:6222" in text and "@node-b.example:6222" in text and "node-c.example" not in text
    for path in paths:  # nats-server's own config check (-t) parses every file
        check = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_unsecured_member_config_has_no_authorization() -> None:
    members = [Member(f"rs-{i}", 4222 + i, 6222 + i) for i in range(3)]
    assert "authorization" not in cluster_config(members[0], members)


# -- a secured cluster (real nats-servers) ---------------------------------------------------------


async def test_a_secured_cluster_refuses_anonymous_clients_and_lets_a_role_discover_every_server(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path / "nats", 3, creds_dir=tmp_path / "creds", run=RUN).start()
    try:
        await cluster.wait_ready()
        refusals = []
        for url in cluster.urls:
            with pytest.raises(nats.errors.Error) as anonymous:
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
            refusals.append(str(anonymous.value))
            bad = cluster.login("rollout") | {"password": "wrong"}
            with pytest.raises(nats.errors.Error):
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, **bad)
        nc = await nats.connect(cluster.urls[2], **cluster.login("rollout"))
        try:
            known = {f"nats://{s.netloc}" for s in nc.servers}
        finally:
            await nc.close()
    finally:
        cluster.stop()
    assert all("authorization violation" in r.lower() for r in refusals), refusals
    assert known == set(cluster.urls)  # one URL is enough: the others are discovered for failover


# -- the whole loop over three hosts (slow) --------------------------------------------------------


@dataclass
class Host:
    index: int
    root: Path
    config: Path
    scope: str
    roles: tuple[str, ...]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


@dataclass
class Outcome:
    replicas: dict[str, int]
    before_kill: dict[str, int]
    after_kill: dict[str, int]
    exit_codes: dict[str, int | None]
    leftovers: dict[str, list[str]]
    containers_seen: dict[str, int]
    died_after_kill: dict[str, str]
    seconds: dict[str, float]


def make_host(i: int, tmp: Path, cluster: Cluster, tag: str) -> Host:
    """``tmp/host<i>``: its own state dir, its roles' credentials only, a config on server ``i``."""
    roles = HOSTS[i]
    root = tmp / f"host{i}"
    creds = root / "creds"
    creds.mkdir(parents=True)
    os.chmod(creds, 0o700)
    for role in roles:  # what an operator copies to this host
        shutil.copy2(cluster.creds_dir / f"{role}.json", creds / f"{role}.json")  # type: ignore[operator]
    scope = f"mh{i}-{tag}"
    cfg = load_config(
        None,
        [
            f"run={RUN}",
            f'state_dir="{root}"',
            f'nats.url="{cluster.urls[i]}"',
            f'nats.creds_dir="{creds}"',
            f'sandboxd.scope="{scope}"',
            "learner.max_staleness=1",
            "learner.batch_size=4",
            "learner.failure_reward=-0.1",
            "learner.warm_start_steps=0",  # covered by tests/test_warmstart_up.py; takes minutes
            "lake.flush_interval_s=1.0",
        ],
    )
    config = root / "rollstream.toml"
    config.write_text(to_toml(cfg))
    return Host(i, root, config, scope, roles)


def start(host: Host, name: str) -> None:
    log = open(host.root / f"{name}.log", "ab")
    args = [sys.executable, "-m", "ops.cli", "worker", name, "--config", str(host.config)]
    host.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def lake_counts(lake: Path) -> dict[str, int]:
    try:
        row = query(
            lake, "SELECT count(*) AS n, count(DISTINCT policy_version) AS versions FROM trajectories"
        ).to_pylist()[0]
    except QueryError:
        return {"n": 0, "versions": 0}
    return {"n": int(row["n"]), "versions": int(row["versions"])}


def scope_containers(scope: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=rollstream.scope={scope}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.split()


def wait_lake(
    hosts: list[Host], seen: dict[str, int], done: object, timeout_s: float, *, strict: bool = True
) -> tuple[dict[str, int], dict[str, str]]:
    """Poll the lake until ``done(counts)``; watch the workers and each scope's containers meanwhile.

    Returns the counts and the workers that died (name -> log tail). ``strict`` fails the run at
    the first death or at the deadline; otherwise either ends the wait and is reported."""
    lake = hosts[0].root / "lake"
    deadline = time.monotonic() + timeout_s
    while True:
        counts = lake_counts(lake)
        if done(counts):  # type: ignore[operator]
            return counts, {}
        dead = {
            f"host{h.index}/{name}": (h.root / f"{name}.log").read_text()[-3000:]
            for h in hosts
            for name, proc in h.procs.items()
            if proc.poll() is not None
        }
        for h in hosts:
            seen[h.scope] = max(seen.get(h.scope, 0), len(scope_containers(h.scope)))
        if dead or time.monotonic() > deadline:
            if strict:
                pytest.fail(f"lake at {counts}; dead workers: {dead}" if dead else f"lake at {counts}")
            return lake_counts(lake), dead
        time.sleep(2.0)


async def replicas_of(cluster: Cluster) -> dict[str, int]:
    nc = await nats.connect(servers=cluster.urls, **cluster.login("ops"))
    try:
        js = nc.jetstream(timeout=10)
        return {s.name: (await js.stream_info(s.name)).config.num_replicas for s in (TASKS, TRAJ)}
    finally:
        await nc.close()


def stop_all(hosts: list[Host], budget_s: float = 60.0) -> dict[str, int | None]:
    """SIGTERM every worker (as `kill` or systemd would) and wait; SIGKILL what outlives the budget."""
    for h in hosts:
        for proc in h.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + budget_s
    codes: dict[str, int | None] = {}
    for h in hosts:
        for name, proc in h.procs.items():
            try:
                codes[f"host{h.index}/{name}"] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[f"host{h.index}/{name}"] = None
                proc.kill()
                proc.wait()
    return codes


@pytest.fixture(scope="module")
def three_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    tmp = tmp_path_factory.mktemp("multihost")
    tag = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    cluster = Cluster(tmp / "nats", 3, creds_dir=tmp / "creds", run=RUN).start()
    hosts: list[Host] = []
    try:
        asyncio.run(cluster.wait_ready())
        hosts = [make_host(i, tmp, cluster, tag) for i in range(3)]
        every = ",".join(cluster.urls)
        ops = tmp / "ops.toml"  # the operator's machine holds the ops credentials
        ops.write_text(to_toml(load_config(None, [f"run={RUN}", f'nats.creds_dir="{tmp / "creds"}"'])))
        ensure = [sys.executable, "-m", "ops.cluster", "ensure", "--config", str(ops)]
        ensure += ["--nats", every, "--replicas", "3"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(ensure, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        replicas = asyncio.run(replicas_of(cluster))
        make_tiny_policy(hosts[0].root / "policy" / "base")
        for h in hosts[1:]:
            shutil.copytree(hosts[0].root / "policy", h.root / "policy")
        for h in hosts:  # sandboxd first, as `just up` does
            start(h, "sandboxd")
        for h in hosts:
            for name in h.roles[1:]:
                start(h, name)
        seen: dict[str, int] = {}
        before, _ = wait_lake(hosts, seen, lambda c: c["versions"] >= 2 and c["n"] >= 4, 240)
        t_kill = time.monotonic()
        cluster.kill(KILLED)
        after, dead = wait_lake(hosts, seen, lambda c: c["n"] >= before["n"] + 6, 120, strict=False)
        t_after = time.monotonic()
        codes = stop_all(hosts)
        leftovers = {h.scope: scope_containers(h.scope) for h in hosts}
        yield Outcome(
            replicas,
            before,
            after,
            codes,
            leftovers,
            seen,
            dead,
            {"to_two_versions": t_kill - t0, "recovery": t_after - t_kill, "total": time.monotonic() - t0},
        )
    finally:
        stop_all(hosts, budget_s=10)
        cluster.stop()
        for h in hosts:
            ids = scope_containers(h.scope)
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)


@pytest.mark.docker
@pytest.mark.slow
def test_ops_creates_every_stream_with_three_replicas(three_hosts: Outcome) -> None:
    assert three_hosts.replicas == {TASKS.name: 3, TRAJ.name: 3}


@pytest.mark.docker
@pytest.mark.slow
def test_trajectories_of_two_policy_versions_reach_the_lake_on_the_learner_host(three_hosts: Outcome) -> None:
    assert three_hosts.before_kill["versions"] >= 2
    assert three_hosts.before_kill["n"] >= 4
    assert sum(1 for n in three_hosts.containers_seen.values() if n > 0) >= 1, three_hosts.containers_seen


@pytest.mark.docker
@pytest.mark.slow
def test_the_loop_keeps_producing_trajectories_after_a_server_is_killed(three_hosts: Outcome) -> None:
    assert three_hosts.died_after_kill == {}, list(three_hosts.died_after_kill)
    assert three_hosts.after_kill["n"] >= three_hosts.before_kill["n"] + 6
    print("multihost timings (s):", {k: round(v, 1) for k, v in three_hosts.seconds.items()})


@pytest.mark.docker
@pytest.mark.slow
def test_sigterm_stops_every_worker_and_leaves_no_container_of_any_scope(three_hosts: Outcome) -> None:
    assert all(code is not None for code in three_hosts.exit_codes.values()), three_hosts.exit_codes
    assert three_hosts.leftovers == {scope: [] for scope in three_hosts.leftovers}
