"""One worker process: load settings, connect, start the named worker, stop on SIGINT/SIGTERM.

``main()`` only loads settings, opens one task group and starts the worker in it; a signal
cancels the root scope and each worker finalises under a shielded budget.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ops.config import Config
from streams.topology import ensure

log = structlog.get_logger(__name__)
WORKERS = ("sandboxd", "producer", "rollout", "reward", "learner", "lake", "proxy")


async def connect(cfg: Config, role: str, **extra: Any) -> NATS:
    """Connect to the broker as ``role``, with its credentials when the deployment has them."""
    opts: dict[str, Any] = {
        "name": f"rollstream-{role}-{os.getpid()}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        **extra,
    }
    if cfg.nats.creds_dir:
        from ops.security import inbox_prefix, role_credentials

        user, password = role_credentials(cfg, role)
        opts |= {"user": user, "password": password, "inbox_prefix": inbox_prefix(role)}
    # A comma-separated list names several cluster members: nats-py fails over between them.
    return await nats.connect(servers=[u.strip() for u in cfg.nats_url.split(",") if u.strip()], **opts)


def _starter(name: str, cfg: Config, js: JetStreamContext, nc: NATS) -> Callable[..., Awaitable[Any]]:
    if name == "sandboxd":
        from sandboxd import daemon

        return lambda task_status: daemon.run(cfg.sandboxd, nc, task_status=task_status)
    if name == "producer":
        from producers import tasks

        return lambda task_status: tasks.run(cfg, js, nc, task_status=task_status)
    if name == "rollout":
        from consumers import rollout

        return lambda task_status: rollout.run(cfg, js, nc, task_status=task_status)
    if name == "reward":
        from consumers import reward

        return lambda task_status: reward.run(cfg, js, nc, task_status=task_status)
    if name == "learner":
        return lambda task_status: _learner(cfg, js, nc, task_status=task_status)
    if name == "lake":
        from consumers import lake

        return lambda task_status: lake.run(cfg, js, task_status=task_status)
    if name == "proxy":
        from consumers import proxy_worker

        return lambda task_status: proxy_worker.run(cfg, js, task_status=task_status)
    raise ValueError(f"unknown worker {name!r}; choose one of {', '.join(WORKERS)}")


async def _learner(cfg: Config, js: JetStreamContext, nc: NATS, *, task_status: Any) -> None:
    """The learner role: the replay warm start when the run has no checkpoint, then training."""
    from learner import warmstart, worker

    await warmstart.prepare_warm_start(cfg, js, nc)
    await worker.run(cfg, js, task_status=task_status)


async def _watch_signals(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name)
            scope.cancel()
            return


def start_metrics(port: int) -> None:
    """Serve this process's Prometheus metrics; a busy port costs the metrics, not the worker."""
    if port <= 0:
        return
    from ops.metrics import start_metrics_server

    try:
        start_metrics_server(port)
        log.info("metrics_serving", url=f"http://127.0.0.1:{port}/metrics")
    except OSError as exc:
        log.warning("metrics_unavailable", port=port, error=str(exc))


def set_torch_threads(threads: int) -> None:
    """Limit torch's intra-op threads in this process (see ``Config.torch_threads``); 0 leaves them."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


async def run_worker(name: str, cfg: Config, metrics_port: int = 0) -> None:
    """Run worker ``name`` until a signal arrives."""
    structlog.contextvars.bind_contextvars(run=cfg.run, worker=name, pid=os.getpid())
    start_metrics(metrics_port)
    if name in ("rollout", "learner", "proxy"):
        set_torch_threads(cfg.torch_threads)
    nc = await connect(cfg, name)
    try:
        js = nc.jetstream(timeout=10)
        if name != "sandboxd" and not cfg.nats.creds_dir:
            # Without per-role credentials (development, tests) a worker may create the topology
            # itself; with them only the ops role (the supervisor) may, and already has.
            await ensure(js, cfg.run)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, scope)
                await tg.start(_starter(name, cfg, js, nc))
                log.info("worker_ready")
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()
        log.info("worker_stopped")
