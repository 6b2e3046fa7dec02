"""The model proxy as a worker: an OpenAI-compatible endpoint in front of the policy.

Unmodified agents that speak the OpenAI API (``/v1/chat/completions`` with tools) produce
trainable trajectories: every call is recorded as chunks (tokens, behaviour log-probabilities,
policy version) and the finished session is published to the run's trajectory subjects. The
engine follows the learner's versions like a rollout worker does.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from agent_harness.batcher import Batcher
from agent_harness.model import PolicySettings
from agent_harness.proxy import ModelProxy, ProxySettings, serve
from consumers.rollout import WeightSync, make_engine
from consumers.settings import RolloutSettings
from streams.bus import Publisher

log = structlog.get_logger(__name__)


async def _follow(sync: WeightSync, every_s: float) -> None:
    while True:
        await sync.refresh()
        await anyio.sleep(every_s)


async def run(
    settings: ProxySettings,
    rollout: RolloutSettings,
    js: JetStreamContext,
    *,
    run: str,
    policy_dir: Path,
    policy_settings: PolicySettings | None = None,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the proxy of run ``run`` until cancelled, on the engine ``rollout`` names for the
    policy at ``policy_dir`` (loaded as ``policy_settings`` says); ``task_status`` receives its
    base URL."""
    inner = await anyio.to_thread.run_sync(make_engine, rollout, policy_dir, policy_settings)
    engine = Batcher(inner, max_batch=8, max_wait_s=rollout.harness.batch_max_wait_ms / 1000)
    sync = WeightSync(js, run, engine)
    proxy = ModelProxy(engine, Publisher(js), run, settings)
    proxy.before_call = sync.refresh  # each call on the newest announced weights, as a rollout turn
    async with anyio.create_task_group() as tg:
        tg.start_soon(_follow, sync, 2.0)
        await serve(proxy, task_status=task_status)
