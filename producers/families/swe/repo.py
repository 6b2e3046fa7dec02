"""Git on the host for SWE-style instances: find the repository, check out a commit as plain files
(``git archive``), apply a patch to such a copy and read back the files it touched.

The sandbox needs no git: its image holds the checkout at ``/testbed`` (``COPY``), the verifier's
files are the test files after ``test_patch``, and the reference solution writes the files as they
are after the gold ``patch``. Remote repositories are cloned once into the cache directory.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "rollstream" / "swe"


class RepoError(Exception):
    """A git operation on an instance's repository failed; the message says which and why."""


def _git(args: list[str], *, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    if shutil.which("git") is None:
        raise RepoError("git is missing on this host: install it (`apt-get install -y git`)")
    out = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True)
    if out.returncode != 0:
        raise RepoError(f"git {args[0]} failed: {out.stderr.decode(errors='replace').strip()[-500:]}")
    return out.stdout


def is_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def git_dir(repo: str, base: Path, cache: Path) -> Path:
    """A local git directory for ``repo``: a path (relative to ``base``) as it is, a URL cloned
    (bare) into ``cache`` once."""
    if not is_url(repo):
        path = (base / repo).resolve()
        if not path.exists():
            raise RepoError(f"no repository at {path}")
        return path
    target = cache / "repos" / hashlib.sha256(repo.encode()).hexdigest()[:16]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _git(["clone", "--bare", "--quiet", repo, str(target)])
    return target


def is_bare(gitdir: Path) -> bool:
    return (gitdir / "HEAD").is_file() and (gitdir / "objects").is_dir()


def _loc(gitdir: Path) -> list[str]:
    return ["--git-dir", str(gitdir)] if is_bare(gitdir) else ["-C", str(gitdir)]


def resolve_commit(gitdir: Path, commit: str) -> str:
    """The full hash of ``commit`` in ``gitdir`` (raises ``RepoError`` if it is not there)."""
    return _git([*_loc(gitdir), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"]).decode().strip()


def checkout(gitdir: Path, commit: str, into: Path) -> Path:
    """The files of ``commit`` extracted into ``into`` (created; must not exist)."""
    data = _git([*_loc(gitdir), "archive", "--format=tar", commit])
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="tar")
    return into


@dataclass(frozen=True, slots=True)
class PatchedFiles:
    """The files a patch leaves behind (path -> bytes) and the paths it deletes."""

    files: dict[str, bytes]
    deleted: list[str]


def touched(patch: str) -> list[str]:
    """The paths a unified diff touches (after the change)."""
    out = _git(["apply", "--numstat", "-"], input=patch.encode())
    return [line.split("\t", 2)[2] for line in out.decode().splitlines() if line.count("\t") >= 2]


def apply_patch(tree: Path, patch: str) -> PatchedFiles:
    """Apply ``patch`` to the plain directory ``tree`` (no repository needed) and read what it touched."""
    paths = touched(patch)
    _git(["apply", "--whitespace=nowarn", "-"], cwd=tree, input=patch.encode())
    files = {p: (tree / p).read_bytes() for p in paths if (tree / p).is_file()}
    return PatchedFiles(files=files, deleted=[p for p in paths if not (tree / p).exists()])
