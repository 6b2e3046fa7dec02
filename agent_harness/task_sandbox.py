"""What an episode's sandbox needs from its task: the create options and the working directory.

Plain tasks (built-in families, JSONL) ask for nothing beyond their environment, so their calls
stay as they were; imported tasks (Harbor, Terminal-Bench, SWE-style) name their image, their
resources and their working directory. Shared by the agent loop, the reward worker (which rebuilds
a lost sandbox) and the evaluator.
"""

from __future__ import annotations

from typing import Any

from schemas.task import Task

DEFAULT_WORKDIR = "/work"


def create_options(task: Task) -> dict[str, Any]:
    """Keyword arguments for ``SandboxClient.create`` beyond the environment ({} for plain tasks)."""
    opts: dict[str, Any] = {}
    r = task.resources
    if task.image:
        opts["image"] = task.image
    if r.cpus > 0:
        opts["cpus"] = r.cpus
    if r.memory_mb > 0:
        opts["memory_mb"] = r.memory_mb
    if r.writable_root:
        opts["writable_root"] = True
    if r.work_mb > 0:
        opts["work_mb"] = r.work_mb
    return opts


def exec_options(task: Task) -> dict[str, Any]:
    """Keyword arguments for ``SandboxClient.exec`` of the task's commands ({} for plain tasks)."""
    return {"cwd": task.workdir} if task.workdir != DEFAULT_WORKDIR else {}


def episode_timeout(task: Task, default_s: float) -> float:
    """The episode's wall-clock limit: the task's agent timeout when it has one."""
    return task.agent_timeout_s if task.agent_timeout_s > 0 else default_s
