"""What every task importer (``harbor`` for Harbor and Terminal-Bench directories, ``swe`` for
SWE-style instances) produces: per task either a ``Task`` and the source of its environment, or the
problems that keep it from being imported, each naming the file and field at fault.

``prepare`` then builds each distinct environment once (``sandboxd.taskenv``: content-addressed,
cached, ``docker build --network none``) and fills in the tasks' image tags and working
directories; a failed build becomes a problem of every task that needs that environment.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
import msgspec

from producers.families.base import TaskParams, TaskSandbox
from sandboxd import taskenv
from sandboxd.errors import EnvHubError
from schemas.task import MAX_TASK_FILE_BYTES, Task, task_files_bytes

Format = Literal["harbor", "terminal-bench", "swe"]
Severity = Literal["error", "warning"]
MAX_TURNS = 20  # turns an imported task's episode may take (its own time limit also applies)


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a task cannot be imported (``error``) or what it lacks (``warning``)."""

    file: str  # relative to the task directory (or the JSONL file and line)
    field: str  # "" for the whole file
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file} [{self.field}]" if self.field else self.file
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class EnvSource:
    """Where a task's image comes from: a prebuilt ``docker_image`` present on this host, or a
    Dockerfile and its build context (``exclude``: context entries that must never reach the
    image, e.g. an old Terminal-Bench task's tests beside its Dockerfile)."""

    docker_image: str = ""
    dockerfile: Path | None = None
    context: Path | None = None
    exclude: tuple[str, ...] = ()
    build_timeout_s: float = 600.0
    workdir: str = ""  # the tasks' working directory ("" = the image's WORKDIR)
    envhub_spec: Path | None = None  # stands in when the Dockerfile's base image cannot be had offline

    @property
    def key(self) -> tuple[object, ...]:
        return (self.docker_image, self.dockerfile, self.context, self.exclude, self.envhub_spec)


@dataclass(frozen=True)
class Imported:
    """One task as imported: ``task`` (image and workdir filled by ``prepare``) or ``problems``."""

    name: str
    format: Format
    path: Path
    task: Task | None
    env: EnvSource | None
    problems: list[Problem] = field(default_factory=list)
    build_s: float = 0.0  # seconds this process spent building its image (0: cached)

    @property
    def ok(self) -> bool:
        return self.task is not None and not any(p.severity == "error" for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def failed(name: str, fmt: Format, path: Path, problems: list[Problem]) -> Imported:
    return Imported(name=name, format=fmt, path=path, task=None, env=None, problems=problems)


def files_under(root: Path, target: str) -> Iterator[tuple[str, Path]]:
    """(sandbox path, host file) for every regular file under ``root``, mapped below ``target``."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield f"{target.rstrip('/')}/{path.relative_to(root).as_posix()}", path


def size_problem(task: Task, file: str) -> Problem | None:
    """A problem when the task's verifier and oracle files exceed what a task may carry."""
    size = task_files_bytes(task)
    if size <= MAX_TASK_FILE_BYTES:
        return None
    return Problem(
        file,
        "",
        f"the test and solution files hold {size} bytes; a task may carry at most "
        f"{MAX_TASK_FILE_BYTES} (put large fixtures into the environment instead)",
    )


def meta_strings(table: object) -> dict[str, str]:
    """A metadata table as strings (lists joined with commas, nested tables as JSON)."""
    if not isinstance(table, dict):
        return {}
    out = {}
    for key, value in table.items():
        if isinstance(value, list):
            out[str(key)] = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            out[str(key)] = msgspec.json.encode(value).decode()
        else:
            out[str(key)] = str(value)
    return out


def _filtered_context(src: Path, exclude: tuple[str, ...], into: Path) -> Path:
    """A copy of ``src`` without the top-level entries ``exclude`` (tests must not reach the image)."""
    ctx = into / "context"
    shutil.copytree(
        src, ctx, symlinks=True, ignore=lambda d, names: [n for n in names if d == str(src) and n in exclude]
    )
    return ctx


def build_env(name: str, env: EnvSource, *, network: str = "none") -> taskenv.BuiltImage:
    """The image of one environment (built unless present); raises ``TaskEnvError`` naming ``name``.
    Order: a ``docker_image`` present here, the Dockerfile, the EnvHub spec (when there is no
    Dockerfile, or its base image cannot be had offline)."""
    if env.docker_image and (
        env.dockerfile is None or taskenv.inspect(taskenv.resolve_ref(env.docker_image))
    ):
        return taskenv.local_image(name, env.docker_image)
    if env.dockerfile is None and env.envhub_spec is not None:
        return taskenv.from_spec(name, env.envhub_spec)
    try:
        return _from_dockerfile(name, env, network)
    except taskenv.BaseImageMissing:
        if env.envhub_spec is None:
            raise
        return taskenv.from_spec(name, env.envhub_spec)


def _from_dockerfile(name: str, env: EnvSource, network: str) -> taskenv.BuiltImage:
    assert env.dockerfile is not None
    context = env.context or env.dockerfile.parent
    if not env.exclude:
        return taskenv.build(name, env.dockerfile, context, network=network, timeout_s=env.build_timeout_s)
    with tempfile.TemporaryDirectory(prefix="rollstream-ctx-") as tmp:
        ctx = _filtered_context(context, env.exclude, Path(tmp))
        dockerfile = env.dockerfile
        if dockerfile.is_relative_to(context):  # keep the Dockerfile even if its name is excluded
            dockerfile = Path(tmp) / "Dockerfile.rollstream"
            shutil.copyfile(env.dockerfile, dockerfile)
        return taskenv.build(name, dockerfile, ctx, network=network, timeout_s=env.build_timeout_s)


Progress = Callable[[str], None]


def prepare(
    items: list[Imported], *, network: str = "none", progress: Progress | None = None
) -> list[Imported]:
    """Build every distinct environment of the importable ``items`` once and fill in each task's
    ``image`` and ``workdir``; a failed build becomes an error of each task that needs it."""
    built: dict[tuple[object, ...], taskenv.BuiltImage | Problem] = {}
    out = []
    for item in items:
        if not item.ok or item.env is None or item.task is None:
            out.append(item)
            continue
        key = item.env.key
        started = time.monotonic()
        if key not in built:
            if progress is not None:
                progress(f"environment of {item.name}")
            try:
                built[key] = build_env(item.name, item.env, network=network)
            except EnvHubError as exc:
                where = (
                    os.path.relpath(item.env.dockerfile, item.path) if item.env.dockerfile else "docker_image"
                )
                built[key] = Problem(where, "", exc.message)
        result = built[key]
        if isinstance(result, Problem):
            out.append(replace(item, problems=[*item.problems, result]))
            continue
        workdir = item.env.workdir or result.workdir
        task = msgspec.structs.replace(item.task, image=result.tag, workdir=workdir)
        out.append(replace(item, task=task, build_s=time.monotonic() - started if result.built else 0.0))
    return out


def importable(items: list[Imported]) -> list[Task]:
    """The tasks of the items that imported without errors."""
    return [i.task for i in items if i.ok and i.task is not None]


def cycle(tasks: list[Task], *, seed: int, start: int, count: int) -> list[Task]:
    """Tasks ``start .. start+count-1`` of an endless stream over ``tasks``: epoch ``e`` visits every
    task once in an order drawn from ``(seed, e)``; its tasks are ``<name>@<e>`` (ids stay unique
    across epochs), with ``metadata["task"] = <name>``."""
    if not tasks:
        return []
    out = []
    for i in range(start, start + count):
        epoch, k = divmod(i, len(tasks))
        order = list(range(len(tasks)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        task = tasks[order[k]]
        meta = task.metadata | {"task": task.task_id, "epoch": str(epoch)}
        out.append(msgspec.structs.replace(task, task_id=f"{task.task_id}@{epoch}", metadata=meta))
    return out


class ImportedStream:
    """The endless task stream over an imported task set (``producer.path``): loaded, validated and
    its images built once per process and path, then cycled. One per format (``noun`` names its
    items in the error for a path that holds none)."""

    def __init__(self, load: Callable[[Path], list[Imported]], noun: str) -> None:
        self.load, self.noun = load, noun
        self._prepared: dict[tuple[str, str], list[Task]] = {}

    def prepared_tasks(self, path: Path, *, network: str = "none") -> list[Task]:
        """The importable tasks of ``path`` with their images built (memoised per process)."""
        key = (str(Path(path).resolve()), network)
        if key not in self._prepared:
            self._prepared[key] = importable(prepare(self.load(path), network=network))
        return self._prepared[key]

    async def make_tasks(
        self, sandbox: TaskSandbox, params: TaskParams, *, seed: int, start: int, count: int
    ) -> list[Task]:
        """Tasks ``start..start+count-1`` of the endless stream over ``producer.path``'s tasks."""
        tasks = await anyio.to_thread.run_sync(partial(self.prepared_tasks, Path(params.path)))
        if not tasks:
            raise ValueError(
                f"producer.path = {params.path!r} holds no importable {self.noun}: "
                "run `rollstream tasks import`"
            )
        return cycle(tasks, seed=seed, start=start, count=count)
