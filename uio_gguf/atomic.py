"""Atomic writes: a file or directory appears under its final name whole, or not at all.

Every writer of a result (memory files, checkpoints, bundles, the native plugin, token files) goes
through these two helpers, so an interrupted run never leaves half a file that a later run trusts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The process's umask, read once at import (reading it means setting it): mkstemp and mkdtemp create
# owner-only files, while a result should get the permissions open() and mkdir() would have given it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path next to `path` (ending in `suffix`, for writers that add one) to write;
    it replaces `path` when the block ends without an error and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def previous_dir(path: str | Path) -> Path:
    """Where atomic_dir keeps the old directory between its two renames (a crash there leaves it)."""
    path = Path(path)
    return path.parent / f".{path.name}.old"


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yields a temporary directory next to `path` to fill; it becomes `path` when the block ends
    without an error. An existing `path` is replaced (replace=True) or kept, the new one dropped
    (replace=False: another process made the same thing first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists() and not replace:
            return
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = previous_dir(path)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if replace or not path.exists():  # not a lost race with another writer
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
