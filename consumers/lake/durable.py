"""Atomic, durable writes: the one helper behind every lake part, every compacted part and every
learner checkpoint.

``atomic_write(final, fill)`` lets ``fill`` build the content at a hidden temporary path next to
``final`` (a file, or a directory of files), fsyncs it, renames it over ``final`` and fsyncs the
parent directory. Readers see the old content or the new one, never a half-written one; after a
crash only a hidden ``.<name>.tmp-<hex>`` is left, which readers skip (and ``compact`` removes).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TMP_MARK = ".tmp-"  # temporary names are ".<final name>.tmp-<8 hex>"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of file ``path`` durable."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def ensure_dir(path: Path) -> None:
    """Create ``path`` and make each newly created directory entry durable in its parent."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def temporary_path(final: Path) -> Path:
    """A hidden, unique sibling of ``final`` to build its content in."""
    return final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
        fsync_dir(path)
    else:
        fsync_file(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(final: Path, fill: Callable[[Path], T]) -> T:
    """Build ``final`` atomically and durably; returns what ``fill`` returns.

    ``fill(tmp)`` creates the content at ``tmp`` (a file or a directory). Then: fsync every file
    (and directory) under ``tmp``, rename ``tmp`` to ``final``, fsync the parent. A directory
    already at ``final`` is first moved aside and removed after the rename. Missing parents are
    created durably. On any failure the temporary content is removed and the error propagates;
    ``final`` is then as it was.
    """
    ensure_dir(final.parent)
    tmp = temporary_path(final)
    old: Path | None = None
    try:
        result = fill(tmp)
        _fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            old = temporary_path(final.with_name(final.name + ".old"))
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        if old is not None and not final.exists():
            os.replace(old, final)  # put the previous directory back
            old = None
        raise
    if old is not None:
        _remove(old)
    return result
