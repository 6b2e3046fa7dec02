"""What a task family is: a name and the hooks that the producer, the workers, the expert seeder,
the demonstrations and the default tokenizer take from it.

A family owns everything about its tasks: how they are made (``make_tasks``), which tools an
episode of one offers (``tools``; the rollout worker runs them, the reward worker re-runs them to
rebuild a lost sandbox), a scripted expert that plays them (``expert``) and, optionally, text to
train a tokenizer on (``corpus``). Verification is data: a task carries its verify commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from agent_harness.engine import InferenceEngine
from agent_harness.tools import ToolsFor
from schemas.sandbox import Created, ExecResult
from schemas.task import Task


class TaskParams(Protocol):
    """The producer settings a family reads (``producers.settings.ProducerSettings`` has them)."""

    @property
    def levels(self) -> tuple[int, ...]: ...

    @property
    def env_id(self) -> str: ...

    @property
    def reward(self) -> str: ...  # "graded": the task's own graded reward if any; "won": 1 iff verified

    @property
    def path(self) -> str: ...  # a task file or directory (imported families: harbor, swe)

    @property
    def note_extra(self) -> float: ...  # files: the fraction of level-2 notes with a second line


class TaskSandbox(Protocol):
    """The part of ``sandboxd.client.SandboxClient`` that making tasks may use."""

    async def create(self, environment: str = "base", *, ttl_s: float | None = ...) -> Created: ...

    async def exec(self, sandbox_id: str, command: str, *, timeout_s: float = ...) -> ExecResult: ...

    async def close(self, sandbox_id: str) -> None: ...


class MakeTasks(Protocol):
    """Tasks ``start .. start+count-1`` of the family's stream under ``seed`` (deterministic ids)."""

    async def __call__(
        self, sandbox: TaskSandbox, params: TaskParams, *, seed: int, start: int, count: int
    ) -> list[Task]: ...


class ExpertFactory(Protocol):
    """A scripted expert for one episode or many: an engine that errs with ``error_rate`` and takes
    the family's known shortcut (if it has one) with probability ``shortcut``."""

    def __call__(
        self, *, tokenizer: Any, error_rate: float, seed: int, version: int, shortcut: float = 0.0
    ) -> InferenceEngine: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One task family. ``name`` is what its tasks' ``Task.family`` starts with (``files``, or
    ``gem`` in ``gem:<env id>``); ``source`` is the ``producer.source`` that selects it."""

    name: str
    source: str
    make_tasks: MakeTasks
    tools: ToolsFor
    expert: ExpertFactory
    batch: int = 64  # tasks per ``make_tasks`` call when the producer streams them
    corpus: Callable[..., Iterator[str]] | None = None  # corpus(seed=...) for a tokenizer
