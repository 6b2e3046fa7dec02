"""Task environments: images built from a Dockerfile and its build context, content-addressed.

An imported task (Harbor, Terminal-Bench, SWE-style) brings a Dockerfile. Its image is tagged
``rollstream-task:<16 hex of sha256(Dockerfile, every context file's path, mode and bytes)>``, so
tasks with the same environment share one image, a changed file gives a new tag, and a tag that is
present is never rebuilt. Builds run ``docker build --network none`` by default (offline: the
Dockerfile may only use what its ``FROM`` image and its context hold). The image's working
directory is made the agent uid's (``AGENT_WORKDIR``).

``FROM rollstream-env/<name>`` (no tag, or ``:latest``) means the EnvHub image of environment
``<name>`` (``sandboxd/envs/<name>.toml``), built first if missing; any other ``FROM`` image must be
present on this Docker host (or reachable, with ``network="default"``). A failed build raises
``TaskEnvError`` naming the task, the failing step and the tail of the build's output.

Everything here blocks (subprocesses); async callers go through ``anyio.to_thread``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import msgspec

from sandboxd import envhub
from sandboxd.errors import EnvHubError
from sandboxd.users import AGENT_GID, AGENT_UID

REPO = "rollstream-task"
LABEL = "rollstream.taskenv"
ENVHUB_REF = re.compile(r"^rollstream-env/([a-z0-9][a-z0-9_.-]*)(?::latest)?$")
_FROM = re.compile(r"^(\s*FROM\s+)(?:--platform=\S+\s+)?(\S+)(.*)$", re.I | re.M)
_STEP = re.compile(r"^Step (\d+/\d+) : (.*)$")  # the classic builder's progress lines
_KIT_ERROR = re.compile(r"ERROR \[[^\]]*\] (.*)$")  # BuildKit's
# Appended to every task Dockerfile: the agent (uid 1000, ``sandboxd.users``) runs the task's commands
# and must write its working directory, which a Dockerfile's COPY/WORKDIR leaves owned by root, and
# ``/solution``, where ``rollstream eval --agent oracle`` writes a task's reference solution.
_OWNED = f"{AGENT_UID}:{AGENT_GID}"
AGENT_WORKDIR = (
    "\nUSER root\n"
    f'RUN d="$(pwd)"; if [ "$d" != / ]; then chown -R {_OWNED} -- "$d"; fi; '
    f"mkdir -p /solution && chown {_OWNED} /solution\n"
)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class TaskEnvError(EnvHubError):
    """A task's environment cannot be built or found; the message names the task and the step."""


class BaseImageMissing(TaskEnvError):
    """The Dockerfile's ``FROM`` image is not on this host and the build is offline: an EnvHub
    spec of the task may stand in."""


class BuiltImage(msgspec.Struct, frozen=True, kw_only=True):
    """A task image: its tag, its working directory, and whether this call built it (and how long)."""

    tag: str
    workdir: str
    built: bool = False
    seconds: float = 0.0


def _docker() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise TaskEnvError(
            "the docker command line is missing: install it with `apt-get install -y docker.io`."
        )
    return exe


def resolve_ref(ref: str) -> str:
    """An image reference with ``rollstream-env/<name>`` (untagged or ``:latest``) replaced by the
    EnvHub tag of ``<name>`` (its spec's hash); other references are returned as they are."""
    m = ENVHUB_REF.match(ref.strip())
    return envhub.image_tag(m.group(1)) if m else ref.strip()


def _envhub_name(ref: str) -> str | None:
    m = ENVHUB_REF.match(ref.strip())
    return m.group(1) if m else None


def rewrite_from(dockerfile: str) -> tuple[str, list[str]]:
    """The Dockerfile with EnvHub ``FROM`` references resolved, and every base image it names
    (stage names of a multi-stage build excepted)."""
    stages: set[str] = set()
    bases: list[str] = []

    def sub(m: re.Match[str]) -> str:
        ref = m.group(2)
        rest = m.group(3)
        alias = re.search(r"\s+AS\s+(\S+)", rest, re.I)
        if ref.lower() in stages:
            resolved = ref
        else:
            resolved = resolve_ref(ref)
            bases.append(resolved)
        if alias:
            stages.add(alias.group(1).lower())
        return f"{m.group(1)}{resolved}{rest}"

    return _FROM.sub(sub, dockerfile), bases


def context_digest(dockerfile: bytes, context: Path) -> str:
    """sha256 over the Dockerfile and every file under ``context``: relative path, mode, bytes.
    Symlinks count by their target text; directories by their path."""
    h = hashlib.sha256(b"dockerfile\0" + dockerfile + b"\0")
    if context.is_dir():
        for path in sorted(context.rglob("*")):
            rel = path.relative_to(context).as_posix()
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode & 0o777777:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode() + b"\0")
            elif path.is_file():
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def image_tag(dockerfile: bytes, context: Path) -> str:
    """``rollstream-task:<16 hex>`` of a Dockerfile (EnvHub references resolved) and its context."""
    text, _ = rewrite_from(dockerfile.decode(errors="replace"))
    return f"{REPO}:{context_digest(text.encode(), context)[:16]}"


def inspect(ref: str) -> dict[str, object] | None:
    """``docker image inspect`` of ``ref``, or None when it is not present on this host."""
    out = subprocess.run([_docker(), "image", "inspect", ref], capture_output=True)
    if out.returncode != 0:
        return None
    found = msgspec.json.decode(out.stdout)
    return found[0] if found else None


def workdir_of(info: dict[str, object]) -> str:
    """The image's ``WORKDIR`` (``/`` when it sets none)."""
    config = info.get("Config") or {}
    workdir = config.get("WorkingDir") if isinstance(config, dict) else ""
    return str(workdir or "/")


def local_image(task: str, ref: str) -> BuiltImage:
    """A prebuilt image (``docker_image``) that must be present here (EnvHub names resolve, and
    build), made a task image of its own: ``FROM`` it plus ``AGENT_WORKDIR`` (a ``rollstream-task``
    tag, which sandboxd accepts, with the working directory the agent's)."""
    name = _envhub_name(ref)
    tag = envhub.ensure_image(name) if name else ref
    if inspect(tag) is None:
        raise TaskEnvError(
            f"task {task}: image {ref!r} is not present on this Docker host and no registry is reachable: "
            "build or load it first (`docker load`), or give the task an environment/Dockerfile."
        )
    return derived(task, tag)


def derived(task: str, tag: str) -> BuiltImage:
    """The task image ``FROM tag`` with ``AGENT_WORKDIR`` (built unless present)."""
    with tempfile.TemporaryDirectory(prefix="rollstream-prebuilt-") as tmp:
        dockerfile = Path(tmp) / "Dockerfile"
        dockerfile.write_text(f"FROM {tag}\n")
        return build(task, dockerfile, Path(tmp) / "no-context")


def from_spec(task: str, spec: Path) -> BuiltImage:
    """The EnvHub image of a task's own spec file (``environment/envhub.toml``), built unless present:
    what stands in offline for a Dockerfile whose base image cannot be had."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", f"task-{task}".lower()).strip("-.")[:60]
    started = time.monotonic()
    tag, env = envhub.build_spec_file(name, spec)
    seconds = time.monotonic() - started
    if inspect(tag) is None:
        raise TaskEnvError(f"task {task}: building {spec} reported success but {tag} is missing.")
    image = derived(task, tag)
    workdir = env.workdir or image.workdir
    return BuiltImage(tag=image.tag, workdir=workdir, built=seconds > 1.0, seconds=seconds + image.seconds)


def _lock(tag: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(tag, threading.Lock())


def build(
    task: str,
    dockerfile: Path,
    context: Path,
    *,
    network: str = "none",
    timeout_s: float = 600.0,
) -> BuiltImage:
    """The image of ``dockerfile`` with build context ``context``, built unless present (once per
    distinct environment, also across threads). Raises ``TaskEnvError`` naming ``task``."""
    if not dockerfile.is_file():
        raise TaskEnvError(f"task {task}: {dockerfile} does not exist.")
    text, bases = rewrite_from(dockerfile.read_text(errors="replace"))
    text = text.rstrip("\n") + "\n" + AGENT_WORKDIR
    tag = f"{REPO}:{context_digest(text.encode(), context)[:16]}"
    with _lock(tag):
        info = inspect(tag)
        if info is not None:
            return BuiltImage(tag=tag, workdir=workdir_of(info))
        for base in bases:
            _ensure_base(task, base, network)
        started = time.monotonic()
        _run_build(task, text, context, tag, network, timeout_s)
        seconds = time.monotonic() - started
        info = inspect(tag)
        if info is None:
            raise TaskEnvError(f"task {task}: docker build reported success but {tag} is missing.")
    return BuiltImage(tag=tag, workdir=workdir_of(info), built=True, seconds=seconds)


def _ensure_base(task: str, base: str, network: str) -> None:
    """Build a missing EnvHub base; refuse early (offline) a base image that is not present."""
    for name in envhub.env_names():
        if base.startswith(f"rollstream-env/{name}:"):
            if base == envhub.image_tag(name):
                envhub.ensure_image(name)
            return
    if network == "none" and inspect(base) is None:
        raise BaseImageMissing(
            f"task {task}: the Dockerfile's base image {base!r} is not present on this Docker host, and "
            "builds run offline (--network none): use `FROM rollstream-env/base` (an EnvHub image) or "
            "load the image first."
        )


def _run_build(task: str, dockerfile: str, context: Path, tag: str, network: str, timeout_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="rollstream-ctx-") as empty:
        where = context if context.is_dir() else Path(empty)
        cmd = [
            _docker(),
            "build",
            "--force-rm",
            "--network",
            network,
            "--label",
            f"{LABEL}=1",
            "-t",
            tag,
            "-f",
            "-",
        ]
        env = dict(os.environ) | {"DOCKER_BUILDKIT": "0"}  # the classic builder's `Step N/M` lines
        out = _build_process(task, [*cmd, str(where)], dockerfile, env, timeout_s)
    if out.returncode != 0:
        log = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
        raise TaskEnvError(f"task {task}: environment build failed{failing_step(log)}:\n{tail(log)}")


def _build_process(
    task: str, cmd: list[str], dockerfile: str, env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, input=dockerfile.encode(), capture_output=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        step = failing_step((exc.stdout or b"").decode(errors="replace"))
        raise TaskEnvError(f"task {task}: environment build timed out after {timeout_s:.0f}s{step}.") from exc


def failing_step(log: str) -> str:
    """`` at step 3/5 `RUN make` `` from a build's output (the last step it started), or ""."""
    last = ""
    for line in log.splitlines():
        if m := _STEP.match(line.strip()):
            last = f" at step {m.group(1)} `{m.group(2)[:200]}`"
        elif m := _KIT_ERROR.search(line):
            last = f" at `{m.group(1)[:200]}`"
    return last


def tail(log: str, lines: int = 15) -> str:
    """The last ``lines`` non-empty lines of a build's output."""
    kept: deque[str] = deque(maxlen=lines)
    notice = False  # the classic builder's deprecation notice: a DEPRECATED line and indented ones
    for line in log.splitlines():
        notice = line.startswith("DEPRECATED:") or (notice and line[:1].isspace())
        if line.strip() and not notice:
            kept.append(line.rstrip()[:400])
    return "\n".join(kept)
