"""GEM task families: any GEM env id (``game:GuessTheNumber-v0-easy``, ...) as ``Task``s.

Task ``i`` of env ``E`` under seed ``s`` plays ``E`` reset with ``gem_seed(s, i)``; its family is
``gem:E``. Its instruction is the env's first observation, which only the env itself can produce,
so building tasks asks a sandbox of the ``gem`` image for the observations of a batch (one
``exec`` per ``OBSERVE_BATCH`` tasks); this also rejects an unknown env id before any rollout
starts. In the episode, the setup command resets the env with the same seed (same observation),
the policy plays with the ``act`` tool (``producers.families.gem.tools``) and the verify command
exits 0 iff it won. The episode's graded reward (GEM's summed step rewards) is scored unless the
producer asks for ``reward = "won"`` (``won_only``).
"""

from __future__ import annotations

import hashlib
import re

import anyio
import msgspec

from producers.families.base import TaskParams, TaskSandbox
from producers.families.gem.api import (
    ENVIRONMENT,
    RESULT_PATH,
    VERIFY_COMMAND,
    GemError,
    GemSession,
    reset_command,
)
from schemas.task import Task

FAMILY = "gem"
FAMILY_PREFIX = "gem:"
DEFAULT_MAX_TURNS = 12
OBSERVE_BATCH = 16  # first observations per sandbox exec (~750 bytes each): one answer must fit the
# 16 KB output cap of an exec
OBSERVE_CONCURRENCY = 4
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
    sandbox: TaskSandbox,
    env_id: str,
    *,
    seed: int,
    count: int,
    start: int = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    group_size: int = 1,
    environment: str = ENVIRONMENT,
) -> list[Task]:
    """Tasks ``start .. start+count-1`` of ``env_id`` under ``seed``, their first observations read
    ``OBSERVE_BATCH`` per sandbox; an unknown id raises ``GemError`` (kind ``unknown_env``) naming
    it and a few known ids."""
    observed: dict[int, list[tuple[int, str]]] = {}
    limit = anyio.Semaphore(OBSERVE_CONCURRENCY)

    async def batch(first: int) -> None:
        async with limit:
            seeds = [gem_seed(seed, i) for i in range(first, min(first + OBSERVE_BATCH, start + count))]
            observed[first] = await _observe(sandbox, env_id, seeds, environment)

    try:
        async with anyio.create_task_group() as tg:
            for first in range(start, start + count, OBSERVE_BATCH):
                tg.start_soon(batch, first)
    except* GemError as group:
        raise group.exceptions[0] from None
    pairs = [pair for first in sorted(observed) for pair in observed[first]]
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
        for i, (env_seed, observation) in zip(range(start, start + count), pairs, strict=True)
    ]


async def _observe(
    sandbox: TaskSandbox, env_id: str, seeds: list[int], environment: str
) -> list[tuple[int, str]]:
    session = await GemSession.open(sandbox, env_id, environment=environment)
    try:
        return await session.observe(seeds)
    finally:
        with anyio.move_on_after(30, shield=True):
            await session.close()


def won_only(task: Task) -> Task:
    """``task`` without its graded-reward file: the reward worker then scores it by its verify
    command alone, 1.0 iff the game was won, else 0.0. (GEM's graded reward gives a lost game
    partial credit, which trained the tiny policy to lose close: see ``ops/demo_gem.py``.)"""
    metadata = {k: v for k, v in task.metadata.items() if k != "result_path"}
    return msgspec.structs.replace(task, metadata=metadata)


async def make_tasks(
    sandbox: TaskSandbox, params: TaskParams, *, seed: int, start: int, count: int
) -> list[Task]:
    """The family's ``make_tasks`` hook: tasks of ``params.env_id``, scored as ``params.reward`` says."""
    if not params.env_id:
        raise GemError("bad_request", "GEM tasks need an env id: set producer.env_id")
    tasks = await gem_tasks(sandbox, params.env_id, seed=seed, count=count, start=start)
    return [won_only(t) for t in tasks] if params.reward == "won" else tasks
