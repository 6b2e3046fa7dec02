"""Harbor / Terminal-Bench 2.0 task directories.

::

    <task>/instruction.md        what the agent is asked
    <task>/task.toml             [verifier] timeout_sec, [agent] timeout_sec,
                                 [environment] cpus, memory_mb, docker_image, build_timeout_sec, [metadata]
    <task>/environment/Dockerfile  (+ its build context: the environment/ directory)
    <task>/tests/test.sh         (+ the files it uses), copied to /tests after the agent's last command
    <task>/solution/solve.sh     the reference solution (+ its files), copied to /solution

The verifier runs ``bash /tests/test.sh`` in the image's working directory; the reward is what it
writes to ``/logs/verifier/reward.txt`` or ``reward.json``, else its exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from producers.families.harbor.common import compose_problem, number, read_instruction
from producers.families.imported import (
    MAX_TURNS,
    EnvSource,
    Imported,
    Problem,
    failed,
    files_under,
    meta_strings,
    size_problem,
)
from schemas.task import Oracle, Task, TaskResources, Verifier

FAMILY = "harbor"
DEFAULT_AGENT_TIMEOUT_S = 600.0
DEFAULT_VERIFIER_TIMEOUT_S = 600.0


def _sections(doc: dict[str, Any], problems: list[Problem]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ("verifier", "agent", "environment", "metadata", "solution"):
        value = doc.get(name, {})
        if not isinstance(value, dict):
            problems.append(Problem("task.toml", name, f"[{name}] must be a table"))
            value = {}
        out[name] = value
    return out


def _environment(root: Path, env: dict[str, Any], problems: list[Problem]) -> EnvSource | None:
    dockerfile = root / "environment" / "Dockerfile"
    spec = root / "environment" / "envhub.toml"  # rollstream's offline stand-in for the Dockerfile
    image = env.get("docker_image") or ""
    if not isinstance(image, str):
        problems.append(Problem("task.toml", "environment.docker_image", "must be a string"))
        image = ""
    if not dockerfile.is_file() and not image and not spec.is_file():
        problems.append(
            Problem(
                "environment/Dockerfile", "", "missing (and task.toml sets no [environment] docker_image)"
            )
        )
        return None
    compose = compose_problem(root / "environment", "environment/")
    if compose is not None:
        problems.append(compose)
    timeout = number(env, "build_timeout_sec", 600.0, problems, "environment")
    return EnvSource(
        docker_image=image,
        dockerfile=dockerfile if dockerfile.is_file() else None,
        context=root / "environment",
        build_timeout_s=timeout,
        envhub_spec=spec if spec.is_file() else None,
    )


def _verifier(root: Path, section: dict[str, Any], problems: list[Problem]) -> Verifier | None:
    tests = root / "tests"
    if not (tests / "test.sh").is_file():
        problems.append(Problem("tests/test.sh", "", "missing: the verifier runs `bash /tests/test.sh`"))
        return None
    env = section.get("env", {})
    return Verifier(
        command="bash /tests/test.sh",
        files={dst: src.read_bytes() for dst, src in files_under(tests, "/tests")},
        timeout_s=number(section, "timeout_sec", DEFAULT_VERIFIER_TIMEOUT_S, problems, "verifier"),
        env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
    )


def _oracle(root: Path, timeout_s: float, problems: list[Problem]) -> Oracle | None:
    solution = root / "solution"
    if not (solution / "solve.sh").is_file():
        problems.append(
            Problem(
                "solution/solve.sh", "", "missing: no reference solution to check the task with", "warning"
            )
        )
        return None
    files = {dst: src.read_bytes() for dst, src in files_under(solution, "/solution")}
    return Oracle(command="bash /solution/solve.sh", files=files, timeout_s=timeout_s)


def load_harbor(root: Path) -> Imported:
    """One Harbor task directory: the task, or the problems that keep it out."""
    name = root.name
    problems: list[Problem] = []
    try:
        doc = msgspec.toml.decode((root / "task.toml").read_bytes())
    except msgspec.DecodeError as exc:
        return failed(name, "harbor", root, [Problem("task.toml", "", f"not valid TOML: {exc}")])
    sections = _sections(doc, problems)
    instruction = read_instruction(root / "instruction.md", "instruction.md", problems)
    env = _environment(root, sections["environment"], problems)
    verifier = _verifier(root, sections["verifier"], problems)
    agent_timeout = number(sections["agent"], "timeout_sec", DEFAULT_AGENT_TIMEOUT_S, problems, "agent")
    oracle = _oracle(root, agent_timeout, problems)
    resources = TaskResources(
        cpus=number(sections["environment"], "cpus", 1.0, problems, "environment"),
        memory_mb=int(number(sections["environment"], "memory_mb", 2048, problems, "environment")),
        writable_root=True,
    )
    if any(p.severity == "error" for p in problems) or not instruction or verifier is None:
        return failed(name, "harbor", root, problems)
    task = Task(
        task_id=name,
        family=FAMILY,
        instruction=instruction,
        resources=resources,
        agent_timeout_s=agent_timeout,
        max_turns=MAX_TURNS,
        verifier=verifier,
        oracle=oracle,
        metadata=meta_strings(sections["metadata"]) | {"format": "harbor"},
    )
    if (too_big := size_problem(task, "tests/")) is not None:
        return failed(name, "harbor", root, [*problems, too_big])
    return Imported(name=name, format="harbor", path=root, task=task, env=env, problems=problems)
