"""`rollstream serve`: one OpenAI-compatible inference server process over the torch engine.

Server ``index`` listens on ``serve.port + index``; it starts from the configured policy and loads
new versions when a rollout worker (``engine = "openai"``) asks it to (``/update_weights_from_disk``
with a path under the run's weights directory). A signal stops it.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import anyio
import structlog

from ops.config import Config

if TYPE_CHECKING:
    from agent_harness.server import PolicyServer

log = structlog.get_logger(__name__)


def build_server(cfg: Config) -> PolicyServer:
    """The torch engine for the configured policy, behind a batcher, inside a ``PolicyServer``."""
    from agent_harness.batcher import Batcher
    from agent_harness.lora import AdapterEngine
    from agent_harness.server import PolicyServer
    from agent_harness.torch_engine import TorchEngine

    torch_engine = TorchEngine(cfg.policy_dir, num_threads=cfg.torch_threads or None)
    inner = AdapterEngine(torch_engine, cfg.policy_dir)  # reloads may name LoRA adapters
    engine = Batcher(inner, max_batch=cfg.serve.max_batch, max_wait_s=cfg.serve.batch_max_wait_ms / 1000)
    cfg.weights_dir.mkdir(parents=True, exist_ok=True)
    return PolicyServer(engine, cfg.serve, weights_root=cfg.weights_dir)


async def run_server(cfg: Config, index: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    from agent_harness.server import serve

    structlog.contextvars.bind_contextvars(run=cfg.run, worker="serve", index=index, pid=os.getpid())
    server = await anyio.to_thread.run_sync(build_server, cfg)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve(server, port=cfg.serve.port + index, task_status=task_status)
            )
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal", signal=signal.Signals(signum).name)
                    scope.cancel()
                    break
    log.info("serve_stopped")
