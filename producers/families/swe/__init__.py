"""The ``swe`` family: SWE-style instances (a repository at a base commit, a problem statement,
FAIL_TO_PASS / PASS_TO_PASS tests) as tasks for training (``producer.source = "swe"``) and
evaluation (``rollstream eval``).

``load(path)`` reads a JSONL file of ``SweInstance`` lines (``instances``). Per instance, the host
checks out the base commit (``repo``) into a build context whose image copies it to ``workdir``;
the verifier's files are the test runner (``/tests/run_tests.sh``) and the test files after
``test_patch``; the oracle writes the files as the gold ``patch`` leaves them. No git is needed in
the sandbox. The reward is 1.0 iff every FAIL_TO_PASS test passes and no PASS_TO_PASS breaks.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import tempfile
from pathlib import Path

import msgspec

from agent_harness.tools import default_tools
from producers.families.base import Family
from producers.families.harbor import no_expert
from producers.families.imported import (
    EnvSource,
    Imported,
    ImportedStream,
    Problem,
    failed,
    size_problem,
)
from producers.families.swe.instances import SweInstance, test_ids
from producers.families.swe.repo import (
    DEFAULT_CACHE,
    RepoError,
    apply_patch,
    checkout,
    git_dir,
    resolve_commit,
)
from schemas.task import Oracle, Task, TaskResources, Verifier

FAMILY = "swe"
RESULTS = "/logs/verifier/tests.txt"
TEST_LOG = "/logs/verifier/test-output.txt"
_decoder = msgspec.json.Decoder(SweInstance)


def runner_script(inst: SweInstance, tests: list[str]) -> str:
    """``/tests/run_tests.sh``: run the tests in ``workdir`` and write ``PASSED``/``FAILED`` lines."""
    lines = ["#!/bin/bash", f"cd {shlex.quote(inst.workdir)} || exit 2", f": > {RESULTS}"]
    limit = f"timeout -s KILL {inst.test_timeout_sec:g}"
    if "{test}" in inst.test_command:
        for test in tests:
            cmd = inst.test_command.replace("{test}", shlex.quote(test))
            passed, failed_ = shlex.quote(f"PASSED {test}"), shlex.quote(f"FAILED {test}")
            lines.append(
                f"if {limit} bash -c {shlex.quote(cmd)} >> {TEST_LOG} 2>&1; "
                f"then echo {passed} >> {RESULTS}; else echo {failed_} >> {RESULTS}; fi"
            )
    else:
        cmd = inst.test_command.replace("{tests}", " ".join(shlex.quote(t) for t in tests))
        keep = f"grep -E '^(PASSED|FAILED) ' >> {RESULTS}"
        lines.append(f"{limit} bash -c {shlex.quote(cmd)} 2>&1 | tee {TEST_LOG} | {keep}")
    return "\n".join(lines) + "\nexit 0\n"


def _oracle(inst: SweInstance, base: Path, work: Path) -> Oracle | None:
    """The gold patch as files to copy over the checkout (and paths to delete)."""
    if not inst.patch:
        return None
    tree = checkout_copy(base, work / "gold")
    patched = apply_patch(tree, inst.patch)
    files = {f"/solution/files/{p}": data for p, data in patched.files.items()}
    script = [f"cp -a /solution/files/. {shlex.quote(inst.workdir)}/"] if patched.files else []
    script += [f"rm -f -- {shlex.quote(inst.workdir + '/' + p)}" for p in patched.deleted]
    files["/solution/solve.sh"] = ("#!/bin/bash\nset -e\n" + "\n".join(script) + "\n").encode()
    return Oracle(command="bash /solution/solve.sh", files=files, timeout_s=inst.agent_timeout_sec)


def checkout_copy(base: Path, into: Path) -> Path:
    shutil.copytree(base, into, symlinks=True)
    return into


def _verifier(inst: SweInstance, f2p: list[str], p2p: list[str], base: Path, work: Path) -> Verifier:
    files: dict[str, bytes] = {}
    if inst.test_patch:
        patched = apply_patch(checkout_copy(base, work / "tests"), inst.test_patch)
        files |= {f"{inst.workdir}/{p}": data for p, data in patched.files.items()}
    files["/tests/run_tests.sh"] = runner_script(inst, [*f2p, *p2p]).encode()
    timeout = inst.test_timeout_sec * max(1, len(f2p) + len(p2p)) + 30
    return Verifier(
        command="bash /tests/run_tests.sh",
        files=files,
        timeout_s=timeout,
        fail_to_pass=f2p,
        pass_to_pass=p2p,
        results_file=RESULTS,
    )


def _context(inst: SweInstance, gitdir: Path, commit: str, cache: Path) -> Path:
    """The build context of the instance's environment: the checkout and a Dockerfile (cached)."""
    key = hashlib.sha256(f"{gitdir}\0{commit}\0{inst.image}\0{inst.workdir}".encode()).hexdigest()[:16]
    ctx = cache / "contexts" / key
    if not (ctx / "Dockerfile").is_file():
        ctx.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ctx-", dir=ctx.parent))  # renamed into place when complete
        checkout(gitdir, commit, tmp / "repo")
        (tmp / "Dockerfile").write_text(
            f"FROM {inst.image}\nCOPY repo/ {inst.workdir}/\nWORKDIR {inst.workdir}\n"
        )
        try:
            tmp.rename(ctx)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return ctx


def _instance(inst: SweInstance, where: str, base: Path, cache: Path) -> Imported:
    problems: list[Problem] = []
    try:
        f2p = test_ids(inst.fail_to_pass, "FAIL_TO_PASS")
        p2p = test_ids(inst.pass_to_pass, "PASS_TO_PASS")
    except ValueError as exc:
        return failed(inst.instance_id, "swe", base, [Problem(where, "FAIL_TO_PASS", str(exc))])
    if not f2p:
        problems.append(Problem(where, "FAIL_TO_PASS", "is empty: nothing tells a fix from no fix"))
    try:
        gitdir = git_dir(inst.repo, base, cache)
        commit = resolve_commit(gitdir, inst.base_commit)
    except RepoError as exc:
        return failed(inst.instance_id, "swe", base, [*problems, Problem(where, "repo", str(exc))])
    if not commit:
        return failed(
            inst.instance_id,
            "swe",
            base,
            [Problem(where, "base_commit", f"{inst.base_commit} is not in {inst.repo}")],
        )
    ctx = _context(inst, gitdir, commit, cache)
    with tempfile.TemporaryDirectory(prefix="rollstream-swe-") as tmp:
        try:
            verifier = _verifier(inst, f2p, p2p, ctx / "repo", Path(tmp))
        except RepoError as exc:
            return failed(
                inst.instance_id, "swe", base, [Problem(where, "test_patch", f"does not apply: {exc}")]
            )
        try:
            oracle = _oracle(inst, ctx / "repo", Path(tmp))
        except RepoError as exc:
            return failed(inst.instance_id, "swe", base, [Problem(where, "patch", f"does not apply: {exc}")])
    if oracle is None:
        problems.append(
            Problem(where, "patch", "missing: no reference solution to check the task with", "warning")
        )
    instruction = (
        f"{inst.problem_statement.strip()}\n\nThe repository is checked out at {inst.workdir}; "
        "change its code there so that the problem is solved."
    )
    task = Task(
        task_id=inst.instance_id,
        family=FAMILY,
        instruction=instruction,
        resources=TaskResources(writable_root=True),
        agent_timeout_s=inst.agent_timeout_sec,
        max_turns=20,
        verifier=verifier,
        oracle=oracle,
        metadata={"format": "swe", "repo": inst.repo, "base_commit": commit},
    )
    if (too_big := size_problem(task, where)) is not None:
        problems.append(too_big)
    env = EnvSource(dockerfile=ctx / "Dockerfile", context=ctx, workdir=inst.workdir)
    if any(p.severity == "error" for p in problems):
        return failed(inst.instance_id, "swe", base, problems)
    return Imported(name=inst.instance_id, format="swe", path=base, task=task, env=env, problems=problems)


def load(path: Path, *, cache: Path = DEFAULT_CACHE) -> list[Imported]:
    """Every instance of the JSONL file ``path``; a bad line is a failed item naming line and field."""
    path = Path(path)
    if not path.is_file():
        return [failed(path.name, "swe", path, [Problem(str(path), "", "no such file")])]
    items: list[Imported] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        where = f"{path.name}:{lineno}"
        try:
            inst = _decoder.decode(line)
        except msgspec.ValidationError as exc:
            items.append(failed(f"line {lineno}", "swe", path, [Problem(where, "", str(exc))]))
            continue
        except msgspec.DecodeError as exc:
            items.append(
                failed(f"line {lineno}", "swe", path, [Problem(where, "", f"not valid JSON: {exc}")])
            )
            continue
        if inst.instance_id in seen:
            items.append(failed(inst.instance_id, "swe", path, [Problem(where, "instance_id", "duplicate")]))
            continue
        seen.add(inst.instance_id)
        items.append(_instance(inst, where, path.parent, cache))
    return items


_stream = ImportedStream(load, "instance")
prepared_tasks = _stream.prepared_tasks
make_tasks = _stream.make_tasks


SWE = Family(
    name=FAMILY, source="swe", make_tasks=make_tasks, tools=default_tools, expert=no_expert, batch=16
)

__all__ = ["FAMILY", "SWE", "SweInstance", "load", "prepared_tasks", "runner_script"]
