"""A NATS cluster with JetStream: N nats-server processes on one host, routed to each other.

Used by the fault tests (three servers on loopback, R3 streams) and as the template for a
multi-host deployment: ``cluster_config`` writes one server's configuration; on real hosts give
each server its own host name in ``routes`` and start one per machine (see docs/streams.md).

Run ``python -m ops.cluster <dir> [--servers 3]`` to start a local cluster in the foreground
(Ctrl-C stops it); it prints the client URLs to pass to ``nats.connect(servers=[...])``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.js.errors import APIError, ServiceUnavailableError

from streams.server import NatsServer, NatsServerError, free_port

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


def cluster_config(
    me: Member, members: Sequence[Member], *, cluster_name: str = CLUSTER_NAME, max_payload: str = "8MB"
) -> str:
    """The nats-server configuration of ``me``: JetStream on, routes to every other member.

    The store directory and client port are given on the command line (``NatsServer``)."""
    routes = ", ".join(f'"nats-route://{m.host}:{m.route_port}"' for m in members if m.name != me.name)
    return (
        f'server_name: "{me.name}"\n'
        f"max_payload: {max_payload}\n"
        "jetstream: { enabled: true }\n"
        "cluster {\n"
        f'  name: "{cluster_name}"\n'
        f'  listen: "{me.host}:{me.route_port}"\n'
        f"  routes: [{routes}]\n"
        "}\n"
    )


@dataclass
class Cluster:
    """``size`` nats-servers under ``root`` (``root/<name>/`` holds each one's store, config and log)."""

    root: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)
    servers: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ClusterError(f"a cluster needs at least one server, not {self.size}")
        if not self.members:
            self.members = [Member(f"rs-{i}", free_port(), free_port()) for i in range(self.size)]
        self.servers = [self._server(m) for m in self.members]

    def _server(self, m: Member) -> NatsServer:
        home = self.root / m.name
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "nats.conf"
        conf.write_text(cluster_config(m, self.members))
        return NatsServer(
            store_dir=home / "jetstream", port=m.client_port, host=m.host, config_file=conf,
            log_file=home / "nats.log",
        )  # fmt: skip

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

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
        await wait_jetstream(self.urls, timeout_s)


async def wait_jetstream(urls: Sequence[str], timeout_s: float = 30.0) -> None:
    """Wait until a client connected to ``urls`` gets JetStream account info."""
    deadline = time.monotonic() + timeout_s
    nc = await nats.connect(servers=list(urls), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local NATS JetStream cluster until Ctrl-C.")
    parser.add_argument("root", type=Path, help="directory for the servers' stores, configs and logs")
    parser.add_argument("--servers", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(args.root, args.servers).start()
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
