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
from ops.health import ErrorTally, WorkerFailed, nats_error, publish, report
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


async def run_worker(name: str, cfg: Config, metrics_port: int = 0, tally: ErrorTally | None = None) -> None:
    """Run worker ``name`` until a signal arrives, reporting ``tally`` (``ops.health``) as it grows;
    raises ``WorkerFailed`` when the tally says a non-transient error keeps coming back."""
    structlog.contextvars.bind_contextvars(run=cfg.run, worker=name, pid=os.getpid())
    start_metrics(metrics_port)
    if name in ("rollout", "learner", "proxy"):
        set_torch_threads(cfg.torch_threads)
    nc = await connect(cfg, name, error_cb=nats_error)
    try:
        await _serve(name, cfg, nc, tally)
    except BaseExceptionGroup as group:
        failed, _ = group.split(WorkerFailed)
        if failed is not None:
            raise _first(failed) from None
        await _crashed(name, cfg, nc, tally)
        raise
    except Exception:
        await _crashed(name, cfg, nc, tally)
        raise
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.close()
        log.info("worker_stopped")


async def _crashed(name: str, cfg: Config, nc: NATS, tally: ErrorTally | None) -> None:
    """An exception ends the worker: log it (so the tally counts it) and send the last report."""
    log.exception("worker_crashed")
    if tally is not None:
        with anyio.move_on_after(3, shield=True):
            await publish(nc, cfg.run, name, tally)


def _first(group: BaseExceptionGroup[WorkerFailed]) -> WorkerFailed:
    exc = group.exceptions[0]
    return exc if isinstance(exc, WorkerFailed) else _first(exc)


async def _serve(name: str, cfg: Config, nc: NATS, tally: ErrorTally | None) -> None:
    """The worker itself, beside its signal watch and its health reports."""
    js = nc.jetstream(timeout=10)
    if name != "sandboxd" and not cfg.nats.creds_dir:
        # Without per-role credentials (development, tests) a worker may create the topology
        # itself; with them only the ops role (the supervisor) may, and already has.
        await ensure(js, cfg.run, ack_wait_s=ack_waits(cfg))
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, scope)
            if tally is not None:
                tg.start_soon(report, nc, cfg.run, name, tally)
            await tg.start(starter(name, cfg, js, nc))
            log.info("worker_ready")
