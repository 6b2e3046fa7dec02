"""Record builders: tasks, chunks, trajectories, scored samples, train-log records, and the lake
written from them."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
from nats.js import JetStreamContext

from consumers.lake import LakeWriter
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.codec import scored_decoder, train_decoder
from schemas.episode import ChunkRecord
from schemas.task import Task, TaskSample
from schemas.train import StepStats, TrainRecord
from schemas.trajectory import Chunk, ScoredTrajectory, ToolStatus, Trajectory
from streams.topology import TRAIN, TRAJ, subject

DAY = 1_767_268_800.0  # 2026-01-01T12:00:00Z
LEARNER_RUN = "lw"  # the run of ``scored`` samples
STALENESS_BOUND = 2  # the max_staleness of every ``make_train`` record
GUESS = "game:GuessTheNumber-v0-easy"  # 1..10 within 4 turns: binary search always wins
# A range and turn limit drawn from the seed (binary search still always wins): the expert reads the
# range from the instruction, so it wins only if the task's observation and the reset agree.
GUESS_RANDOM = "game:GuessTheNumber-v0-random"


def task_sample(
    run: str, task_id: str, *, sample_idx: int = 0, created_at: float = 0.0, **task: Any
) -> TaskSample:
    """Sample ``sample_idx`` of a files task (instruction "go" unless given; any Task field)."""
    fields: dict[str, Any] = {"family": "files", "instruction": "go"} | task
    return TaskSample(
        run=run, task=Task(task_id=task_id, **fields), sample_idx=sample_idx, created_at=created_at
    )


def make_task(run: str = "run1", task_id: str = "task-1", sample_idx: int = 0) -> TaskSample:
    """A task as the lake holds it: setup, verify, a group, metadata and non-ASCII text."""
    return task_sample(
        run,
        task_id,
        sample_idx=sample_idx,
        created_at=DAY,
        instruction="Create /work/out.txt containing «héllo».",
        setup=["mkdir -p /work"],
        verify=["test -f /work/out.txt"],
        group_size=4,
        metadata={"split": "train"},
    )


def chunk(
    actions: Sequence[int] | np.ndarray = (),
    logprobs: Sequence[float] | np.ndarray | None = None,
    obs: Sequence[int] | np.ndarray = (),
    *,
    version: int = 0,
    status: ToolStatus = "ok",
    index: int = 0,
    **fields: Any,
) -> Chunk:
    """A policy turn from token ids (log-probs -1.0 each unless given); any other Chunk field."""
    lps = list(logprobs) if logprobs is not None else [-1.0] * len(actions)
    return Chunk(
        index=index,
        action_tokens=pack_tokens(list(actions)),
        action_logprobs=pack_logprobs(lps),
        policy_version=version,
        tool_status=status,
        obs_tokens=pack_tokens(list(obs)),
        **fields,
    )


def trajectory(
    *,
    run: str = "run1",
    task_id: str = "task-1",
    sample_idx: int = 0,
    prompt: Sequence[int] | np.ndarray | bytes = (),
    chunks: Sequence[Chunk] = (),
    min_version: int | None = None,
    max_version: int | None = None,
    **fields: Any,
) -> Trajectory:
    """A completed files trajectory with a rollout worker's ids (``run:task:sample``, group
    ``run:task``); the versions span the chunks' unless given. Any other Trajectory field."""
    versions = [c.policy_version for c in chunks]
    low = min(versions, default=0) if min_version is None else min_version
    ids = {"traj_id": f"{run}:{task_id}:{sample_idx}", "group_id": f"{run}:{task_id}"}
    return Trajectory(
        **({"family": "files", "status": "completed"} | ids | fields),
        run=run,
        task_id=task_id,
        sample_idx=sample_idx,
        prompt_tokens=prompt if isinstance(prompt, bytes) else pack_tokens(list(prompt)),
        chunks=list(chunks),
        min_version=low,
        max_version=max(versions, default=low) if max_version is None else max_version,
    )


def sample(
    prompt: Sequence[int],
    chunks: Sequence[Chunk],
    reward: float,
    *,
    group: str = "g",
    chunk_rewards: Sequence[float] = (),
    min_version: int = 0,
    traj_id: str = "t",
) -> ScoredTrajectory:
    """A learner's training sample from hand-written tokens (run "r", family "fam")."""
    traj = trajectory(
        traj_id=traj_id,
        run="r",
        task_id="task",
        family="fam",
        group_id=group,
        prompt=prompt,
        chunks=chunks,
        min_version=min_version,
    )
    return ScoredTrajectory(traj=traj, reward=reward, chunk_rewards=list(chunk_rewards))


def seeded_scored(
    i: int,
    *,
    run: str,
    version: int = 0,
    reward: float = 1.0,
    commands: Sequence[str] = ("ls", "ls"),
    logprob: float | None = -2.0,
    vocab: tuple[int, int] = (1, 64),
    sizes: tuple[int, int, int] = (5, 3, 6),
    obs_text: str = "",
    finished_at: float = 0.0,
    scored_at: float = 0.0,
) -> ScoredTrajectory:
    """Task ``t{i}`` of ``run``: one bash chunk per command at ``version``, tokens drawn from
    ``vocab`` (default: the tiny test policy's 64) by a generator seeded with ``i``. ``sizes`` are
    the action, observation and prompt lengths; ``logprob=None`` draws each log-prob too."""
    rng = np.random.default_rng(i)
    low, high = vocab
    n_action, n_obs, n_prompt = sizes
    chunks = [
        chunk(
            rng.integers(low, high, n_action),
            [logprob] * n_action if logprob is not None else -rng.random(n_action),
            rng.integers(low, high, n_obs),
            index=k,
            version=version,
            tool_name="bash",
            tool_args=f'{{"command": "{command}"}}',
            obs_text=obs_text,
        )
        for k, command in enumerate(commands)
    ]
    traj = trajectory(
        run=run,
        task_id=f"t{i}",
        prompt=rng.integers(low, high, n_prompt),
        chunks=chunks,
        min_version=version,
        max_version=version,
        finished_at=finished_at,
    )
    return ScoredTrajectory(traj=traj, reward=reward, scored_at=scored_at)


def scored(i: int, version: int, reward: float = 1.0) -> ScoredTrajectory:
    """A two-chunk sample of ``LEARNER_RUN`` generated by ``version`` (behaviour log-probs -2)."""
    return seeded_scored(i, run=LEARNER_RUN, version=version, reward=reward)


def group_member(task: int, k: int, group_size: int = 4, reward: float = 1.0) -> ScoredTrajectory:
    """Member ``k`` of the task group ``t<task>`` (a built-in task of ``group_size`` samples), as
    ``scored`` makes it."""
    from producers.families.files import builtin_tasks

    s = scored(task, 0, reward=reward)
    spec = builtin_tasks(seed=task, count=1, levels=(1,))[0]
    spec = msgspec.structs.replace(spec, task_id=f"t{task}", group_size=group_size)
    traj = msgspec.structs.replace(s.traj, traj_id=f"{LEARNER_RUN}:t{task}:{k}", sample_idx=k, task=spec)
    return msgspec.structs.replace(s, traj=traj)


def lake_trajectory(
    i: int, command: str = "ls", *, version: int = 0, reward: float = 1.0
) -> ScoredTrajectory:
    """A trajectory of an earlier run as the lake holds it (vocabulary of the tiny test policy):
    three bash chunks, the second running ``command``."""
    return seeded_scored(
        i,
        run="old",
        version=version,
        reward=reward,
        commands=("cat notes.txt", command, "cat notes.txt"),
        logprob=-4.2,  # about log(1/64): near the tiny policy
        finished_at=DAY + i,
        scored_at=DAY + 1 + i,
    )


def make_chunk(rng: random.Random, index: int, version: int, *, tool_args: str | None = None) -> Chunk:
    """A policy turn with random tokens and log-probs, a tool call and its observation."""
    n_action, n_obs = rng.randint(1, 40), rng.randint(0, 30)
    actions = [rng.randrange(50_000) for _ in range(n_action)]
    logprobs = [-rng.random() * 5 for _ in range(n_action)]
    status = rng.choice(["ok", "error", "timeout"])
    return chunk(
        actions,
        logprobs,
        [rng.randrange(50_000) for _ in range(n_obs)],
        index=index,
        version=version,
        status=status,  # type: ignore[arg-type]
        tool_name="bash",
        tool_args=tool_args if tool_args is not None else '{"cmd": "ls -la /work"}',
        obs_text="total 8\ndrwxr-xr-x 2 root root 4096 .\n",
        gen_ms=rng.random() * 100,
        tool_ms=rng.random() * 30,
    )


def make_scored(
    rng: random.Random,
    *,
    run: str = "run1",
    n_chunks: int = 3,
    first_version: int = 0,
    finished_at: float = DAY,
    tool_args: str | None = None,
    replay: bool = False,
    with_task: bool = True,
) -> ScoredTrajectory:
    """A realistic scored trajectory: a prompt and ``n_chunks`` chunks spanning policy versions."""
    task_id = f"task-{rng.randrange(1000)}"
    versions = [first_version + min(i, 1) for i in range(n_chunks)]
    chunks = [make_chunk(rng, i, v, tool_args=tool_args) for i, v in enumerate(versions)]
    traj = trajectory(
        traj_id=uuid.UUID(int=rng.getrandbits(128)).hex,
        run=run,
        task_id=task_id,
        sample_idx=rng.randrange(8),
        prompt=[rng.randrange(50_000) for _ in range(rng.randint(5, 60))],
        chunks=chunks,
        status="completed" if n_chunks else "aborted",
        min_version=min(versions, default=first_version),
        max_version=max(versions, default=first_version),
        sandbox_id=f"sb-{rng.randrange(10**6)}",
        sandbox_owner="sandboxd-a",
        abort_reason="" if n_chunks else "sandbox died",
        started_at=finished_at - 30.5,
        finished_at=finished_at,
        task=make_task(run, task_id).task if with_task else None,
    )
    return ScoredTrajectory(
        traj=traj,
        reward=float(rng.random() < 0.5),
        chunk_rewards=[0.0] * (n_chunks - 1) + [1.0] if n_chunks else [],
        verifier_output="ok\n",
        valid=bool(n_chunks),
        invalid_reason="" if n_chunks else "sandbox",
        flags=["expert"] if rng.random() < 0.5 else [],
        replay=replay,
        replay_mode="ipa" if replay else "",
        scored_at=finished_at + 1.25,
    )


def scored_at(
    rng: random.Random,
    run: str,
    version: int,
    k: int,
    *,
    reward: float,
    source: str = "online",
    valid: bool = True,
) -> ScoredTrajectory:
    """A trajectory generated by ``version``, finished a few minutes into the run, with a set reward."""
    base = make_scored(rng, run=run, first_version=version, finished_at=DAY + version * 300 + k * 30)
    traj = msgspec.structs.replace(base.traj, source=source)
    return msgspec.structs.replace(
        base, traj=traj, reward=reward, valid=valid, invalid_reason="" if valid else "sandbox"
    )


def make_train(
    scored: ScoredTrajectory,
    step: int = 1,
    *,
    fate: str = "trained",
    reason: str | None = None,
    source: str = "online",
) -> TrainRecord:
    """The learner's account of ``scored`` at ``step`` (a dropped one is "stale" unless given),
    logged ``step`` seconds after the trajectory finished."""
    traj = scored.traj
    return TrainRecord(
        run=traj.run,
        traj_id=traj.traj_id,
        task_id=traj.task_id,
        fate=fate,  # type: ignore[arg-type]
        reason=reason if reason is not None else ("" if fate == "trained" else "stale"),  # type: ignore[arg-type]
        learner_version=step,
        min_version=traj.min_version,
        staleness=step - traj.min_version,
        max_staleness=STALENESS_BOUND,
        step=step,
        reward=scored.reward,
        source=source,  # type: ignore[arg-type]
        loss=0.5,
        time=traj.finished_at + step,
    )


def make_step(step: int = 1, **fields: Any) -> StepStats:
    """One optimiser step of run1 (loss 0.5 at DAY, 8 samples); any other StepStats field."""
    defaults: dict[str, Any] = {
        "run": "run1",
        "version": step,
        "loss": 0.5,
        "samples": 8,
        "dropped": 1,
        "mean_reward": 0.5,
        "mean_ratio": 1.0,
        "masked_fraction": 0.1,
        "grad_norm": 2.0,
        "time": DAY,
    }
    return StepStats(step=step, **(defaults | fields))


def chunk_records(scored: ScoredTrajectory) -> list[ChunkRecord]:
    """The ``ChunkRecord`` of each chunk of ``scored``, as its rollout worker published them."""
    traj = scored.traj
    return [
        ChunkRecord(
            traj_id=traj.traj_id,
            run=traj.run,
            task_id=traj.task_id,
            sample_idx=traj.sample_idx,
            chunk=chunk,
            final=traj.status if chunk.index == len(traj.chunks) - 1 else None,
            sandbox_id=traj.sandbox_id,
            time=traj.started_at + chunk.index,
        )
        for chunk in traj.chunks
    ]


def fill(writer: LakeWriter, rng: random.Random, n: int = 4) -> list[ScoredTrajectory]:
    """Buffer ``n`` trajectories, one task, one train record per trajectory and one step."""
    records = [make_scored(rng, first_version=i % 3) for i in range(n)]
    for scored in records:
        writer.add_scored(scored)
        writer.add_train(make_train(scored))
    writer.add_task(make_task())
    writer.add_train(make_step())
    return records


def write_lake(root: Path, records: Sequence[ScoredTrajectory], *, writer_id: str = "w1") -> Path:
    """Write ``records`` to the lake at ``root`` in one flush."""
    writer = LakeWriter(root, writer_id=writer_id)
    for scored in records:
        writer.add_scored(scored)
    writer.flush()
    return root


async def read_scored(
    js: JetStreamContext, run: str, n: int, *, timeout_s: float, unique: bool = False
) -> list[ScoredTrajectory]:
    """Up to ``n`` scored trajectories of ``run`` from its stream (pulled and acked), within
    ``timeout_s``; ``unique``: ``n`` distinct trajectories, the last record of each (a redelivered
    or re-scored one replaces the earlier)."""
    sub = await js.pull_subscribe(subject("scored", run), stream=TRAJ.name)
    out: dict[str, ScoredTrajectory] = {}
    seen: list[ScoredTrajectory] = []
    with anyio.move_on_after(timeout_s):
        while len(out if unique else seen) < n:
            try:
                msgs = await sub.fetch(10, timeout=2)
            except TimeoutError:
                continue
            for m in msgs:
                record = scored_decoder.decode(m.data)
                seen.append(record)
                out[record.traj.traj_id] = record
                await m.ack()
    return list(out.values()) if unique else seen


async def read_train_log(js: JetStreamContext, run: str, n: int, *, timeout_s: float) -> list[TrainRecord]:
    """Up to ``n`` train records of ``run`` (pulled and acked), within ``timeout_s``."""
    return await _read_train(js, run, n, TrainRecord, timeout_s)


async def read_step_stats(js: JetStreamContext, run: str, n: int, *, timeout_s: float) -> list[StepStats]:
    """Up to ``n`` step statistics of ``run`` from its train stream, within ``timeout_s``."""
    return await _read_train(js, run, n, StepStats, timeout_s)


async def _read_train(js: JetStreamContext, run: str, n: int, kind: type[Any], timeout_s: float) -> list[Any]:
    sub = await js.pull_subscribe(subject("train", run), stream=TRAIN.name)
    out: list[Any] = []
    with anyio.move_on_after(timeout_s):
        while len(out) < n:
            for m in await sub.fetch(10, timeout=5):
                rec = train_decoder.decode(m.data)
                if isinstance(rec, kind):
                    out.append(rec)
                await m.ack()
    return out
