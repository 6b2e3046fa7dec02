"""The permissions table (streams/permissions.py) against the code: every subject the code uses is
granted to some role, every subject the table grants is used somewhere, and a worker whose code
reaches the sandbox client holds the sandbox grants (and only those that call verify may verify).

The dynamic half, workers running against a broker with the generated permissions without a
single violation, is tests/test_e2e_matrix.py (every worker kind under `rollstream up`) and
tests/test_security.py (each role's calls, allowed and refused)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from streams.permissions import SANDBOX_CALLS, SANDBOX_OPS, USES, VERIFY_CALLS, grants

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "streams", "producers", "consumers", "sandboxd", "learner", "agent_harness", "ops")
# what each worker kind runs (ops.pipeline.starter); eval runs on its own broker and sandboxd
ENTRIES = {
    "producer": ["producers.tasks"],
    "rollout": ["consumers.rollout", "producers.families"],
    "reward": ["consumers.reward", "producers.families"],
    "learner": ["learner.warmstart", "learner.worker"],
    "lake": ["consumers.lake"],
    "proxy": ["consumers.proxy_worker"],
}


def overlaps(a: str, b: str) -> bool:
    """Whether two NATS subject patterns can match a common subject."""
    x, y = a.split("."), b.split(".")
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        if p == ">" or q == ">":
            return True
        if p != q and "*" not in (p, q):
            return False
        if i == min(len(x), len(y)) - 1:
            return len(x) == len(y)
    return False


def _pattern(node: ast.AST) -> str | None:
    """A subject literal (``"rs.tasks.{run}"``, ``f"rs.sandbox.{owner}.ping"``) as a pattern."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    else:
        return None
    if not text.startswith("rs.") or " " in text or text.endswith("."):  # a prefix test, not a subject
        return None
    return ".".join("*" if "{" in tok else tok for tok in text.split("."))


def _docstrings(tree: ast.AST) -> set[int]:
    return {
        id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
    }


@cache
def used_subjects() -> frozenset[str]:
    found: set[str] = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            skip = _docstrings(tree)
            for node in ast.walk(tree):
                pattern = _pattern(node) if id(node) not in skip else None
                if pattern and not pattern.endswith(">"):  # stream-wide wildcards are ensure()'s
                    found.add(pattern)
    # the sandbox client builds rs.sandbox.<owner>.<op> from the method's op name
    found |= {f"rs.sandbox.*.{op}" for op in sandbox_client_ops()}
    return frozenset(found - {"rs.sandbox.*.*"})


def sandbox_client_ops() -> set[str]:
    tree = ast.parse((ROOT / "sandboxd" / "client.py").read_text())
    return {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "_subject"
        and len(node.args) == 2
        and isinstance(node.args[1], ast.Constant)
    }


def _rs(role: str) -> list[str]:
    g = grants(role, None)
    return [s.split(" ")[0] for s in (*g.publish, *g.subscribe) if s.startswith("rs.")]


def test_every_subject_the_code_uses_is_granted_to_a_worker_role() -> None:
    workers = [s for role in USES if role != "ops" for s in _rs(role)]
    missing = [
        u
        for u in sorted(used_subjects())
        if not u.startswith("rs.ops.scale") and not any(overlaps(u, g) for g in workers)
    ]
    assert missing == []


def test_every_subject_the_table_grants_is_used_by_the_code() -> None:
    stale = [
        (role, g)
        for role in USES
        if role != "ops"
        for g in _rs(role)
        if not any(overlaps(g, u) for u in used_subjects())
    ]
    assert stale == []


def test_the_table_names_exactly_the_sandbox_operations_the_client_has() -> None:
    assert sandbox_client_ops() == {*SANDBOX_OPS, "verify", "inspect"}


@cache
def closure(module: str) -> frozenset[str]:
    """Modules of this repository that ``module`` imports, at any depth (lazy imports included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return frozenset(seen)


def _path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists() and module.split(".")[0] in PACKAGES:
            return path
    return None


def subjects_in(modules: frozenset[str]) -> set[str]:
    """Subject patterns the code of ``modules`` names (the sandbox client's, when it is among them)."""
    found: set[str] = set()
    for m in modules:
        path = _path(m)
        assert path is not None
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        found |= {
            p for n in ast.walk(tree) if id(n) not in skip and (p := _pattern(n)) and not p.endswith(">")
        }
    if "sandboxd.client" in modules:
        found |= {f"rs.sandbox.*.{op}" for op in sandbox_client_ops()}
    return found


@pytest.mark.parametrize("role", sorted(ENTRIES))
def test_a_role_is_granted_no_subject_its_code_never_uses(role: str) -> None:
    used = subjects_in(frozenset().union(*(closure(e) for e in ENTRIES[role])))
    stale = [
        g for g in _rs(role) if not any(overlaps(g, u) for u in used) and not g.startswith("rs.ops.health")
    ]
    assert stale == []


def test_the_producer_may_create_the_sandboxes_its_gem_family_plays_in() -> None:
    modules = closure("producers.tasks")
    assert {"producers.families.gem.api", "sandboxd.client"} <= modules
    assert set(SANDBOX_CALLS) <= set(grants("producer", None).publish)
    assert not set(VERIFY_CALLS) & set(grants("producer", None).publish)
