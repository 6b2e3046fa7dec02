"""A NATS cluster with JetStream: N nats-server processes, routed to each other, optionally secured.

Used by the fault and multi-host tests (three servers on loopback, R3 streams) and to configure a
real multi-host deployment (docs/multihost.md). With a credentials directory every server carries
the same per-role users of ``ops.security`` (anonymous clients are refused) and the routes between
servers authenticate with their own user (``<creds_dir>/route.json``).

- ``python -m ops.cluster run <dir> [--servers 3] [--creds DIR --run RUN]``: a local cluster in the
  foreground (Ctrl-C stops it); prints the client URLs.
- ``python -m ops.cluster configure <out> --hosts h1,h2,h3 --creds DIR``: one complete ``nats.conf``
  per host, for ``nats-server -c nats.conf`` there.
- ``python -m ops.cluster ensure --config rollstream.toml [--replicas 3]``: create the run's topology
  replicated, as the ops role.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.js.errors import APIError, ServiceUnavailableError

from ops import security
from streams.server import NatsServer, NatsServerError, free_ports
from streams.topology import ensure

if TYPE_CHECKING:
    from ops.config import Config

CLUSTER_NAME = "rollstream"


class ClusterError(RuntimeError):
    """The cluster could not be configured, started, or did not become ready."""


@dataclass(frozen=True)
class Member:
    """One server of the cluster: its name and its client and route ports."""

    name: str
    client_port: int
    route_port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ClusterAuth:
    """What every server of a secured cluster shares: the roles' users and the routes' credentials."""

    authorization: str  # ops.security.authorization_block: identical on every server
    route_user: str
    route_password: str

    @classmethod
    def load(cls, creds_dir: Path, run: str | None = None) -> ClusterAuth:
        """Create any missing credentials under ``creds_dir`` (roles and route) and read them."""
        creds = security.ensure_credentials(creds_dir)
        user, password = security.route_credentials(creds_dir)
        return cls(security.authorization_block(creds, run=run), user, password)


def cluster_config(
    me: Member,
    members: Sequence[Member],
    *,
    cluster_name: str = CLUSTER_NAME,
    max_payload: str = "8MB",
    auth: ClusterAuth | None = None,
    store_dir: str | None = None,
) -> str:
    """The nats-server configuration of ``me``: JetStream on, routes to every other member.

    Without ``store_dir`` the store directory and client port come from the command line
    (``NatsServer``, loopback). With it the file is complete for a real host: ``nats-server -c
    nats.conf`` listens for clients on ``0.0.0.0:<client_port>`` and for routes on
    ``0.0.0.0:<route_port>``. With ``auth`` clients must log in as a role, and routes
    authenticate with the route user (given in each route URL, as nats-server requires)."""
    cred = f"{auth.route_user}:{auth.route_password}@" if auth else ""
    routes = ", ".join(f'"nats-route://{cred}{m.host}:{m.route_port}"' for m in members if m.name != me.name)
    bind = "0.0.0.0" if store_dir else me.host
    lines = [f'server_name: "{me.name}"', f"max_payload: {max_payload}"]
    if store_dir:
        lines += [
            f'listen: "0.0.0.0:{me.client_port}"',
            f"jetstream: {{ enabled: true, store_dir: {json.dumps(store_dir)} }}",
        ]
    else:
        lines.append("jetstream: { enabled: true }")
    lines += ["cluster {", f'  name: "{cluster_name}"', f'  listen: "{bind}:{me.route_port}"']
    if auth:
        lines.append(
            f"  authorization {{ user: {json.dumps(auth.route_user)}, "
            f"password: {json.dumps(auth.route_password)}, timeout: 2 }}"
        )
    lines += [f"  routes: [{routes}]", "}"]
    text = "\n".join(lines) + "\n"
    return text + auth.authorization if auth else text


def write_host_configs(
    out: Path, hosts: Sequence[str], creds_dir: Path, *, run: str | None = None,
    client_port: int = 4222, route_port: int = 6222, store_dir: str = "/var/lib/rollstream/nats",
) -> list[Path]:  # fmt: skip
    """Write ``out/<server>/nats.conf`` (0600) for one server per host, secured with ``creds_dir``.

    Copy each file to its host and start ``nats-server -c nats.conf`` there (docs/multihost.md)."""
    if len(hosts) < 1:
        raise ClusterError("give at least one host")
    auth = ClusterAuth.load(creds_dir, run)
    members = [Member(f"rs-{i}", client_port, route_port, host=h) for i, h in enumerate(hosts)]
    paths = []
    for m in members:
        path = out / m.name / "nats.conf"
        security.write_private(path, cluster_config(m, members, auth=auth, store_dir=store_dir))
        paths.append(path)
    return paths


@dataclass
class Cluster:
    """``size`` nats-servers under ``root`` (``root/<name>/`` holds each one's store, config and log).

    With ``creds_dir`` every server carries the per-role users of ``ops.security`` (anonymous
    clients are refused) and routes authenticate; ``run`` narrows the grants to that run."""

    root: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)
    servers: list[NatsServer] = field(default_factory=list)
    creds_dir: Path | None = None
    run: str | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ClusterError(f"a cluster needs at least one server, not {self.size}")
        if not self.members:
            ports = free_ports(2 * self.size)
            self.members = [Member(f"rs-{i}", ports[2 * i], ports[2 * i + 1]) for i in range(self.size)]
        auth = ClusterAuth.load(self.creds_dir, self.run) if self.creds_dir else None
        self.servers = [self._server(m, auth) for m in self.members]

    def _server(self, m: Member, auth: ClusterAuth | None) -> NatsServer:
        home = self.root / m.name
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "nats.conf"
        security.write_private(conf, cluster_config(m, self.members, auth=auth))
        return NatsServer(
            store_dir=home / "jetstream", port=m.client_port, host=m.host, config_file=conf,
            log_file=home / "nats.log",
        )  # fmt: skip

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def login(self, role: str = "ops") -> dict[str, Any]:
        """``nats.connect`` options for ``role`` (empty when the cluster has no credentials)."""
        if self.creds_dir is None:
            return {}
        user, password = security.role_credentials(self.creds_dir, role)
        return {"user": user, "password": password, "inbox_prefix": security.inbox_prefix(role)}

    def start(self) -> Cluster:
        """Start every server (they find each other through their routes)."""
        for server in self.servers:
            if server.proc is None or server.proc.poll() is not None:
                server.start()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def kill(self, index: int) -> NatsServer:
        """SIGKILL one server, as a crashed machine would stop."""
        self.servers[index].stop(sig_kill=True)
        return self.servers[index]

    def restart(self, index: int) -> NatsServer:
        """Start a stopped server again on its ports and store (it catches up from the others)."""
        return self.servers[index].start()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until JetStream answers through the cluster (a meta leader is elected)."""
        await wait_jetstream(self.urls, timeout_s, **self.login("ops"))


def server_list(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` -> one URL per server (nats-py wants a list for failover)."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def ensure_replicated(cfg: Config, replicas: int = 3) -> None:
    """Create the run's streams, consumers, KV and object store with ``replicas`` copies, as ops."""
    from ops.config import ack_waits

    login: dict[str, Any] = {}
    if cfg.nats.creds_dir:
        user, password = security.role_credentials(cfg.nats.creds_dir, "ops")
        login = {"user": user, "password": password, "inbox_prefix": security.inbox_prefix("ops")}
    nc = await nats.connect(servers=server_list(cfg.nats_url), connect_timeout=5, **login)
    try:
        await ensure(nc.jetstream(timeout=10), cfg.run, replicas=replicas, ack_wait_s=ack_waits(cfg))
    finally:
        await nc.close()


async def wait_jetstream(urls: Sequence[str], timeout_s: float = 30.0, **login: Any) -> None:
    """Wait until a client connected to ``urls`` gets JetStream account info."""
    deadline = time.monotonic() + timeout_s
    nc = await nats.connect(servers=list(urls), max_reconnect_attempts=-1, reconnect_time_wait=0.2, **login)
    try:
        js = nc.jetstream(timeout=2)
        while True:
            try:
                await js.account_info()
                return
            except (APIError, ServiceUnavailableError, TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise ClusterError(f"JetStream did not become ready within {timeout_s:.0f}s") from None
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ops.cluster", description="A NATS JetStream cluster.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a local (loopback) cluster until Ctrl-C")
    run.add_argument("root", type=Path, help="directory for the servers' stores, configs and logs")
    run.add_argument("--servers", type=int, default=3)
    run.add_argument("--creds", type=Path, default=None, help="per-role credentials dir (auth on)")
    run.add_argument("--run", default=None, help="narrow the roles' grants to this run")
    conf = sub.add_parser("configure", help="write one nats.conf per host of a real cluster")
    conf.add_argument("out", type=Path, help="writes OUT/rs-<i>/nats.conf, one per host")
    conf.add_argument("--hosts", required=True, help="comma-separated host names or addresses")
    conf.add_argument("--creds", type=Path, required=True, help="per-role credentials dir")
    conf.add_argument("--run", default=None, help="narrow the roles' grants to this run")
    conf.add_argument("--client-port", type=int, default=4222)
    conf.add_argument("--route-port", type=int, default=6222)
    conf.add_argument("--store-dir", default="/var/lib/rollstream/nats")
    ens = sub.add_parser("ensure", help="create the run's topology replicated, as the ops role")
    ens.add_argument("--config", "-c", type=Path, default=None, help="rollstream.toml")
    ens.add_argument("--nats", default=None, help="broker URLs, comma-separated (overrides nats.url)")
    ens.add_argument("--replicas", type=int, default=3)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv and argv[0] not in ("run", "configure", "ensure", "-h", "--help"):
        argv.insert(0, "run")  # `python -m ops.cluster <dir>` as before
    args = _parser().parse_args(argv)
    if args.cmd == "configure":
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        paths = write_host_configs(
            args.out, hosts, args.creds, run=args.run, client_port=args.client_port,
            route_port=args.route_port, store_dir=args.store_dir,
        )  # fmt: skip
        for host, path in zip(hosts, paths, strict=True):
            print(f"{host}: {path}")
        return
    if args.cmd == "ensure":
        from ops.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, [f'nats.url="{args.nats}"'] if args.nats else [])
            asyncio.run(ensure_replicated(cfg, args.replicas))
        except (ConfigError, security.SecurityError, OSError, nats.errors.Error) as exc:
            raise SystemExit(f"cluster ensure: {exc}") from None
        print(f"topology of run {cfg.run!r} ensured with {args.replicas} replicas", flush=True)
        return
    try:
        cluster = Cluster(args.root, args.servers, creds_dir=args.creds, run=args.run).start()
        asyncio.run(cluster.wait_ready())
    except (ClusterError, NatsServerError) as exc:
        raise SystemExit(f"cluster: {exc}") from None
    print("cluster ready:", ",".join(cluster.urls), flush=True)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
