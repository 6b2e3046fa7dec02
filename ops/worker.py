"""One worker process: load settings, connect, start the named worker (``ops.pipeline``), stop on
SIGINT/SIGTERM.

``main()`` only loads settings, opens one task group and starts the worker in it; a signal
cancels the root scope and each worker finalises under a shielded budget.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import nats
import structlog
from nats.aio.client import Client as NATS

from ops.config import Config, ack_waits
from ops.pipeline import starter
from streams.topology import ensure

log = structlog.get_logger(__name__)


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

        user, password = role_credentials(cfg.nats.creds_dir, role)
        opts |= {"user": user, "password": password, "inbox_prefix": inbox_prefix(role)}
    # A comma-separated list names several cluster members: nats-py fails over between them.
    return await nats.connect(servers=[u.strip() for u in cfg.nats_url.split(",") if u.strip()], **opts)


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
            await ensure(js, cfg.run, ack_wait_s=ack_waits(cfg))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, scope)
                await tg.start(starter(name, cfg, js, nc))
                log.info("worker_ready")
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()
        log.info("worker_stopped")
