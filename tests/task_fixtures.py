"""Task-import fixtures: the Harbor / Terminal-Bench task directories under tests/data/tasks, a small
local git repository with SWE-style instances over it (made here, by git), and their images
(built once per session; content-addressed, so a second session reuses them)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

TASKS = Path(__file__).parent / "data" / "tasks"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "rollstream",
    "GIT_AUTHOR_EMAIL": "tests@rollstream.invalid",
    "GIT_COMMITTER_NAME": "rollstream",
    "GIT_COMMITTER_EMAIL": "tests@rollstream.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}

LIB = """\
#!/bin/bash
# A tiny arithmetic library.
add() { echo $(( $1 + $2 )); }
sub() { echo $(( $1 - $2 )); }
mul() { echo $(( $1 + $2 )); }
"""
GREET = """\
#!/bin/bash
greet() { echo "Hello $1"; }
"""
TESTS = """\
#!/bin/bash
. lib/math.sh
. lib/greet.sh
test_add() { [ "$(add 2 3)" = 5 ]; }
test_sub() { [ "$(sub 5 3)" = 2 ]; }
test_greet() { [ "$(greet Ada)" = "Hello, Ada!" ]; }
"""
RUNNER = """\
#!/bin/bash
# Run one test function of tests/test_math.sh: bash tests/run.sh test_add
. tests/test_math.sh
"$1"
"""


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ) | GIT_ENV
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True)
    return out.stdout


def _write(repo: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)


def _diff(repo: Path, files: dict[str, str]) -> str:
    """The unified diff that turns the checkout into one with ``files`` written (then reset)."""
    _write(repo, files)
    _git(repo, "add", "-A")
    diff = _git(repo, "diff", "--cached")
    _git(repo, "reset", "-q", "--hard")
    return diff


def make_swe_fixture(root: Path) -> Path:
    """A git repository ``root/repo`` (one commit) and ``root/instances.jsonl`` with three
    instances and one whose gold patch does not fix its test; returns the JSONL path."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _write(
        repo, {"lib/math.sh": LIB, "lib/greet.sh": GREET, "tests/test_math.sh": TESTS, "tests/run.sh": RUNNER}
    )
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    fixed_mul = LIB.replace("mul() { echo $(( $1 + $2 )); }", "mul() { echo $(( $1 * $2 )); }")
    with_div = LIB + "div() { echo $(( $1 / $2 )); }\n"
    test_mul = TESTS + 'test_mul() { [ "$(mul 3 4)" = 12 ]; }\n'
    test_div = TESTS + 'test_div() { [ "$(div 12 4)" = 3 ]; }\n'
    common = {"repo": "repo", "base_commit": base, "test_command": "bash tests/run.sh {test}"}
    instances = [
        common
        | {
            "instance_id": "math-mul",
            "problem_statement": "mul in lib/math.sh adds instead of multiplying.",
            "FAIL_TO_PASS": ["test_mul"],
            "PASS_TO_PASS": ["test_add", "test_sub"],
            "patch": _diff(repo, {"lib/math.sh": fixed_mul}),
            "test_patch": _diff(repo, {"tests/test_math.sh": test_mul}),
        },
        common
        | {
            "instance_id": "math-div",
            "problem_statement": "lib/math.sh needs a div function: div 12 4 prints 3 (integer division).",
            "FAIL_TO_PASS": '["test_div"]',  # SWE-bench stores the lists as JSON strings
            "PASS_TO_PASS": '["test_add"]',
            "patch": _diff(repo, {"lib/math.sh": with_div}),
            "test_patch": _diff(repo, {"tests/test_math.sh": test_div}),
        },
        common
        | {
            "instance_id": "greet-punctuation",
            "problem_statement": "greet Ada should print `Hello, Ada!`.",
            "FAIL_TO_PASS": ["test_greet"],
            "PASS_TO_PASS": ["test_add"],
            "patch": _diff(repo, {"lib/greet.sh": GREET.replace('"Hello $1"', '"Hello, $1!"')}),
        },
    ]
    broken = common | {
        "instance_id": "math-mul-wrong-gold",
        "problem_statement": "mul in lib/math.sh adds instead of multiplying.",
        "FAIL_TO_PASS": ["test_mul"],
        "PASS_TO_PASS": ["test_add"],
        "patch": _diff(repo, {"lib/math.sh": LIB.replace("+ $2 )); }\n", "- $2 )); }\n", 1)}),  # breaks add
        "test_patch": _diff(repo, {"tests/test_math.sh": test_mul}),
    }
    (root / "instances.jsonl").write_bytes(b"\n".join(msgspec.json.encode(i) for i in instances) + b"\n")
    (root / "broken.jsonl").write_bytes(msgspec.json.encode(broken) + b"\n")
    return root / "instances.jsonl"


@pytest.fixture(scope="session")
def swe_instances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSONL of three SWE-style instances over a fresh local git repository (``broken.jsonl``
    beside it holds one whose gold patch breaks a PASS_TO_PASS test)."""
    return make_swe_fixture(tmp_path_factory.mktemp("swe"))


@pytest.fixture(scope="session")
def swe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("swe-cache")
