"""The layout holds: folders import downwards only, nothing outside ops/ imports ops/, modules stay small.

Imports are read with ``ast`` (including imports inside functions and under ``TYPE_CHECKING``), so a
lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a folder may import only folders before it (docs/architecture.md explains the order).
LAYERS = ("schemas", "streams", "sandboxd", "agent_harness", "consumers", "producers", "learner", "ops")
MAX_LINES = 500


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for folder in LAYERS:
        for path in _modules(folder):
            for target in _imported_top_levels(path) - {folder}:
                edges.setdefault((folder, target), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_layer_folder_exists_and_holds_python() -> None:
    for folder in LAYERS:
        assert _modules(folder), f"{folder}/ has no Python modules: is LAYERS stale?"


def test_nothing_outside_ops_imports_ops() -> None:
    offenders = {src: files for (src, dst), files in _edges().items() if dst == "ops"}
    assert not offenders, f"folders importing ops/: {offenders}"


def test_folders_import_downwards_only() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = {f"{src} -> {dst}": files[:3] for (src, dst), files in _edges().items() if rank[dst] > rank[src]}
    assert not upward, f"imports of a higher layer (order: {' < '.join(LAYERS)}): {upward}"


def test_no_import_cycle_between_folders() -> None:
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    cycles = [(a, b) for a in graph for b in graph[a] if a in graph.get(b, set())]
    assert not cycles, f"folders importing each other: {sorted(cycles)}"


@pytest.mark.parametrize("folder", LAYERS)
def test_modules_stay_under_500_lines(folder: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(folder)
        if (n := len(p.read_text().splitlines())) >= MAX_LINES
    }
    assert not long, f"modules of {MAX_LINES} lines or more (split them): {long}"


def test_no_test_module_imports_another() -> None:
    tests = ROOT / "tests"
    allowed = {"tests.factories", "tests.conftest", "tests.sandbox_fixtures", "tests.task_fixtures"}
    offenders: dict[str, list[str]] = {}
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            mods: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] if node.level == 0 else [f"tests.{node.module}"]
            elif isinstance(node, ast.Import):
                mods = [alias.name for alias in node.names]
            bad = [m for m in mods if m.startswith("tests.") and m not in allowed]
            if bad:
                offenders.setdefault(path.name, []).extend(bad)
    assert not offenders, f"test modules importing other test modules (use tests/factories.py): {offenders}"
