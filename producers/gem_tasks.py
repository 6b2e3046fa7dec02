"""GEM task families: any GEM env id (``game:GuessTheNumber-v0-easy``, ...) as ``Task``s.

Task ``i`` of env ``E`` under seed ``s`` plays ``E`` reset with ``gem_seed(s, i)``; its family is
``gem:E``. Its instruction is the env's first observation, which only the env itself can produce,
so building tasks asks one sandbox of the ``gem`` image for the observations of a whole batch (one
``exec``); this also rejects an unknown env id before any rollout starts. In the episode, the setup
command resets the env with the same seed (same observation), the policy plays with the ``act``
tool (``agent_harness.gem_episode.GemToolRegistry``) and the verify command exits 0 iff it won.
"""

from __future__ import annotations

import hashlib
import re

import anyio

from sandboxd.gem import ENVIRONMENT, RESULT_PATH, VERIFY_COMMAND, GemSandbox, GemSession, reset_command
from schemas.task import Task

FAMILY_PREFIX = "gem:"
DEFAULT_MAX_TURNS = 12
ACT_HINT = "\nPlay by calling the act tool with your move, one move per turn."


def family_of(env_id: str) -> str:
    return f"{FAMILY_PREFIX}{env_id}"


def gem_seed(seed: int, index: int) -> int:
    """The env seed of task ``index`` in the stream of ``seed`` (deterministic, 31 bits)."""
    digest = hashlib.sha256(f"gem:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _slug(env_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", env_id).strip("-")


def gem_task(
    env_id: str,
    env_seed: int,
    observation: str,
    *,
    task_id: str | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
    group_size: int = 1,
    environment: str = ENVIRONMENT,
) -> Task:
    """The task of ``env_id`` reset with ``env_seed``, whose first observation is ``observation``."""
    return Task(
        task_id=task_id or f"gem-{_slug(env_id)}-e{env_seed}",
        family=family_of(env_id),
        instruction=observation.rstrip() + ACT_HINT,
        environment=environment,
        setup=[reset_command(env_id, env_seed)],
        verify=[VERIFY_COMMAND],
        group_size=group_size,
        max_turns=max_turns,
        metadata={"env_id": env_id, "env_seed": str(env_seed), "result_path": RESULT_PATH},
    )


async def gem_tasks(
    sandbox: GemSandbox,
    env_id: str,
    *,
    seed: int,
    count: int,
    start: int = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    group_size: int = 1,
    environment: str = ENVIRONMENT,
) -> list[Task]:
    """Tasks ``start .. start+count-1`` of ``env_id`` under ``seed``; an unknown id raises
    ``sandboxd.gem.GemError`` (kind ``unknown_env``) naming it and a few known ids."""
    if count < 1:
        return []
    session = await GemSession.open(sandbox, env_id, environment=environment)
    try:
        seeds = [gem_seed(seed, i) for i in range(start, start + count)]
        observed = await session.observe(seeds)
    finally:
        with anyio.move_on_after(30, shield=True):
            await session.close()
    return [
        gem_task(
            env_id,
            env_seed,
            observation,
            task_id=f"gem-{_slug(env_id)}-s{seed}-{i:06d}",
            max_turns=max_turns,
            group_size=group_size,
            environment=environment,
        )
        for i, (env_seed, observation) in zip(range(start, start + count), observed, strict=True)
    ]
