"""``just up``: the broker and one process per worker, supervised, with a live progress view.

Start order: preflight (Docker, port, base image, tiny policy) -> nats-server with JetStream ->
``ensure()`` -> sandboxd -> lake, learner, reward, rollout -> producer. Workers that die are
restarted with backoff. ``rollstream scale`` changes process counts of a running deployment
(request/reply on ``rs.ops.scale.<run>``). SIGINT/SIGTERM (``just down``) stops workers in reverse
order, then the broker, then removes any sandbox container left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import structlog
from nats.aio.msg import Msg

from ops.config import Config, ack_waits, to_toml
from ops.health import HealthBoard
from ops.progress import Progress
from streams.server import NatsServer, NatsServerError, port_in_use
from streams.topology import ensure

log = structlog.get_logger(__name__)
START_ORDER = ("sandboxd", "lake", "learner", "reward", "serve", "rollout", "producer", "proxy", "eval")
# Processes that are no broker worker: `rollstream serve` (an inference server, no NATS connection).
SERVERS = ("serve",)


class PreflightError(RuntimeError):
    """Something the deployment needs is missing; the message says what to do."""


def docker_ok() -> str | None:
    """None when a Docker engine answers, else one sentence saying what is wrong."""
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20
        )
    except FileNotFoundError:
        return (
            "the docker command is not installed: run `bash bootstrap.sh` "
            "(Debian: apt-get install -y docker.io)."
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s."
    if out.returncode != 0:
        return (
            "no Docker engine answers at /var/run/docker.sock: start it (`bash bootstrap.sh` does, or "
            "`dockerd --iptables=false --bridge=none &`)."
        )
    return None


def preflight(cfg: Config, *, quiet: bool = False) -> None:
    """Check Docker and the port; build the base image and the tiny policy if missing."""
    problem = docker_ok()
    if problem:
        raise PreflightError(problem)
    if not cfg.nats.url and port_in_use(cfg.nats.port, cfg.nats.host):
        raise PreflightError(
            f"port {cfg.nats.port} is already in use: stop what listens there (`just down` if it is an "
            f"earlier rollstream) or set nats.port in rollstream.toml / --set nats.port=N."
        )
    from rich.console import Console

    from sandboxd.envhub import ensure_image, image_exists, image_tag

    console = Console(stderr=True, quiet=quiet)
    if not image_exists(image_tag("base")):
        with console.status("building the base sandbox image (mmdebstrap | docker import, ~1 min)") as st:
            ensure_image("base", progress=lambda line: st.update(f"base image: {line[:100]}"))
    if not (cfg.policy_dir / "config.json").exists():
        from agent_harness.policy_init import create_tiny_policy
        from producers.families.files import corpus

        with console.status("creating the tiny Qwen2 policy and its tokenizer"):
            create_tiny_policy(cfg.policy_dir, corpus(seed=0), seed=0)


@dataclass
class Child:
    name: str
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0


class Supervisor:
    """Owns the broker and the worker processes of one deployment."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = cfg.state
        self.logs = self.state / "logs"
        self.config_path = self.state / "config.toml"
        self.nats: NatsServer | None = None
        self.children: list[Child] = []
        self.desired = {name: getattr(cfg.processes, name) for name in START_ORDER}
        if cfg.eval.every > 0 and cfg.eval.tasks:  # `[eval] every = N` turns the evaluator on
            self.desired["eval"] = 1
        self.stopping = False
        self.restarts: dict[str, int] = {}  # per worker kind, for the live view and status
        self.health = HealthBoard(self.state / "health.json")

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, name: str, index: int, restarts: int = 0) -> Child:
        log_path = self.logs / f"{name}-{index}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        command = (
            ["serve", "--index", str(index)]
            if name in SERVERS
            else ["worker", name, "--metrics-port", str(self.metrics_port(name, index))]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *command, "--config", str(self.config_path)],
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        child = Child(name, index, proc, restarts=restarts)
        self.children.append(child)
        self._write_pids()
        return child

    def metrics_port(self, name: str, index: int) -> int:
        """Stable per (worker, index): base + 16 * position of the worker kind + index."""
        base = self.cfg.metrics.base_port
        return 0 if base == 0 else base + 16 * START_ORDER.index(name) + index

    def _write_pids(self) -> None:
        pids = {
            "supervisor": os.getpid(),
            "nats": self.nats.proc.pid if self.nats and self.nats.proc else None,
            "restarts": self.restarts,
            "workers": [
                {
                    "name": c.name,
                    "index": c.index,
                    "pid": c.proc.pid,
                    "metrics_port": self.metrics_port(c.name, c.index),
                }
                for c in self.children
            ],
        }
        (self.state / "processes.json").write_text(json.dumps(pids, indent=1))

    def problems(self) -> list[str]:
        """One line per worker kind that keeps hitting errors or was restarted (``ops.health``)."""
        return self.health.lines(self.restarts)

    def count(self, name: str) -> int:
        return sum(1 for c in self.children if c.name == name and c.proc.poll() is None)

    def reconcile(self) -> None:
        """Restart dead workers (with backoff) and match process counts to ``desired``."""
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            self.children.remove(child)
            wanted = sum(1 for c in self.children if c.name == child.name) < self.desired[child.name]
            if not self.stopping and wanted:
                log.warning(
                    "worker_died", worker=child.name, index=child.index, code=code, restarts=child.restarts
                )
                self.restarts[child.name] = self.restarts.get(child.name, 0) + 1
                if time.monotonic() - child.started < 10 and child.restarts >= 5:
                    log.error(
                        "worker_keeps_dying",
                        worker=child.name,
                        log=str(self.logs / f"{child.name}-{child.index}.log"),
                    )
                    continue
                self.spawn(child.name, child.index, child.restarts + 1)
        for name in START_ORDER:
            live = [c for c in self.children if c.name == name]
            while len(live) < self.desired[name]:
                used = {c.index for c in live}
                live.append(self.spawn(name, min(set(range(len(live) + 1)) - used)))
            for extra in live[self.desired[name] :]:
                extra.proc.terminate()
                log.info("worker_scaled_down", worker=name, index=extra.index)
        self._write_pids()

    def stop_workers(self, budget_s: float = 30.0) -> None:
        self.stopping = True
        for name in reversed(START_ORDER):
            for c in self.children:
                if c.name == name and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + budget_s
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker_killed", worker=c.name, index=c.index)
                c.proc.kill()
                c.proc.wait()

    # -- lifecycle ------------------------------------------------------------------------------
    def start_broker(self) -> str:
        if self.cfg.nats.url:
            return self.cfg.nats.url
        conf = self.state / "nats.conf"
        if self.cfg.nats.creds_dir:
            from ops.security import write_server_config

            write_server_config(conf, Path(self.cfg.nats.creds_dir), run=self.cfg.run)
        else:
            conf.write_text("max_payload: 8MB\n")
        self.nats = NatsServer(
            store_dir=self.state / "nats",
            host=self.cfg.nats.host,
            port=self.cfg.nats.port,
            config_file=conf,
            log_file=self.logs / "nats.log",
        )
        self.nats.start()
        return self.nats.url

    async def run(self, *, duration_s: float = 0.0, quiet: bool = False) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.state / "supervisor.pid").write_text(str(os.getpid()))
        (self.state / "health.json").unlink(missing_ok=True)  # a new deployment starts with none
        self.config_path.write_text(to_toml(self.cfg))
        self.start_broker()
        from ops.worker import connect

        nc = await connect(self.cfg, "ops")
        try:
            await ensure(nc.jetstream(timeout=10), self.cfg.run, ack_wait_s=ack_waits(self.cfg))
            self.reconcile()
            progress = Progress(self.cfg, nc, self)
            await progress.subscribe()
            await self.health.subscribe(nc, self.cfg.run)
            scale_sub = await nc.subscribe(f"rs.ops.scale.{self.cfg.run}", cb=self._on_scale)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_signals, scope)
                    tg.start_soon(progress.render, quiet)
                    started = time.monotonic()
                    while duration_s <= 0 or time.monotonic() - started < duration_s:
                        self.reconcile()
                        await anyio.sleep(1.0)
                    scope.cancel()
            await scale_sub.unsubscribe()
            progress.summary()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.stop_workers)
                await nc.close()
                if self.nats is not None:
                    self.nats.stop()
                removed = await anyio.to_thread.run_sync(remove_sandboxes, self.cfg.sandboxd.scope)
                if removed:
                    log.info("sandboxes_removed", count=removed)
                (self.state / "supervisor.pid").unlink(missing_ok=True)

    async def _on_scale(self, msg: Msg) -> None:
        try:
            want = msgspec.json.decode(msg.data, type=dict[str, int])
            for name, n in want.items():
                if name not in self.desired or n < 0 or (name in ("producer", "learner", "proxy") and n > 1):
                    raise ValueError(f"cannot scale {name!r} to {n}")
            self.desired.update(want)
            self.reconcile()
            await msg.respond(
                msgspec.json.encode({"ok": True, "counts": {k: self.count(k) for k in self.desired}})
            )
        except (ValueError, msgspec.DecodeError) as exc:
            await msg.respond(msgspec.json.encode({"ok": False, "error": str(exc)}))

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                scope.cancel()
                return


def remove_sandboxes(scope: str) -> int:
    """Remove every sandbox container of this deployment's scope (the last line of defence)."""
    try:
        ids = subprocess.run(
            [
                "docker",
                "ps",
                "-aq",
                "--filter",
                "label=rollstream.sandbox=1",
                "--filter",
                f"label=rollstream.scope={scope}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)
        return len(ids)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return 0


def down(cfg: Config, timeout_s: float = 60.0) -> list[str]:
    """Stop a running deployment; returns what was done. Safe to run when nothing runs."""
    done: list[str] = []
    pid_file = cfg.state / "supervisor.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            done.append(f"asked the supervisor (pid {pid}) to stop")
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
    procs = cfg.state / "processes.json"
    if procs.exists():
        info = json.loads(procs.read_text())
        pids = [w["pid"] for w in info.get("workers", [])] + ([info["nats"]] if info.get("nats") else [])
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
                done.append(f"killed leftover process group {pid}")
            except (ProcessLookupError, PermissionError):
                pass
        procs.unlink()
    removed = remove_sandboxes(cfg.sandboxd.scope)
    if removed:
        done.append(f"removed {removed} sandbox container(s)")
    return done


def with_credentials(cfg: Config) -> Config:
    """The embedded broker always runs with per-role users: default their directory to the state."""
    if cfg.nats.url or cfg.nats.creds_dir:
        return cfg
    creds = str(cfg.state / "creds")
    return msgspec.structs.replace(cfg, nats=msgspec.structs.replace(cfg.nats, creds_dir=creds))


def up(cfg: Config, *, duration_s: float = 0.0, quiet: bool = False) -> None:
    """Preflight, then supervise until interrupted (or for ``duration_s`` seconds)."""
    preflight(cfg, quiet=quiet)
    cfg = with_credentials(cfg)
    try:
        anyio.run(lambda: Supervisor(cfg).run(duration_s=duration_s, quiet=quiet))
    except NatsServerError as exc:
        raise PreflightError(str(exc)) from None
