"""Where uio-gguf keeps what it builds or computes once: $UIO_GGUF_CACHE, else $XDG_CACHE_HOME/uio-gguf,
else ~/.cache/uio-gguf. Subfolders: native/ (the compiled plugin), bundles/ (default bundles put
together), models/ (copies of a bundle's model in the encoder's weight format, uio_gguf/format/derived.py), memory/ (memory files of compressed books, and their start states; memory/books/: the
texts of the books opened on the server's web page, uio_gguf/serve/library.py).

memory/ grows with every book opened (a 56K-token book's memory is 160 MB at ratio 8), so it is kept
under a size limit, $UIO_GGUF_MEMORY_CACHE_GB in GiB (default 4; 0 keeps everything): after each write the
least recently used files go first. A file that is gone is only recomputed the next time. A memory file and
its start states (named after it: KEY.npz, KEY.*.start.npz) are kept or dropped together: a start state is
of no use without its memory file, and a memory file dropped for its start state is compressed again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from uio_gguf.errors import UIOError

MEMORY_LIMIT_ENV = "UIO_GGUF_MEMORY_CACHE_GB"
DEFAULT_MEMORY_LIMIT_GB = 4.0


def cache_root() -> Path:
    """The cache folder; UIOError when it (or a folder above it) is something else, e.g. a file."""
    if os.environ.get("UIO_GGUF_CACHE"):
        root = Path(os.environ["UIO_GGUF_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "uio-gguf"
    else:
        root = Path.home() / ".cache" / "uio-gguf"
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise UIOError(f"the cache folder {root} cannot be made: {path} is not a folder (see UIO_GGUF_CACHE)")
            break
    return root


def memory_dir() -> Path:
    return cache_root() / "memory"


def memory_limit_bytes() -> int | None:
    """The size memory/ is kept under; None for no limit. A value that is not a size warns and keeps
    the default: it is read after a book was compressed, which an error would throw away."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_MEMORY_LIMIT_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        warnings.warn(
            f"{MEMORY_LIMIT_ENV}={text!r} is not a size in GiB (0: no limit); keeping {DEFAULT_MEMORY_LIMIT_GB:g} GiB",
            stacklevel=2,
        )
        gb = DEFAULT_MEMORY_LIMIT_GB
    return None if gb == 0 else int(gb * 2**30)


def mark_used(path: Path) -> None:
    """A cached file was read: it becomes the most recently used (its mtime, which trim_memory_dir orders by)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves; it is only trimmed in another order
        pass


def _owner(path: Path) -> str:
    """The memory key a cached file's name begins with: a memory file's and its start states' own."""
    return path.name.split(".", 1)[0]


def trim_memory_dir(keep: Path) -> list[Path]:
    """After `keep` was written: removes start states whose memory file is gone, then the least recently
    used memory files (each with its start states) until memory/ is under the limit; never `keep` or the
    files that go with it, which may alone exceed it. Files elsewhere are left alone. Returns what was
    removed."""
    keep = Path(keep)
    limit = memory_limit_bytes()
    folder = memory_dir()
    if limit is None or keep.parent.resolve() != folder.resolve():
        return []
    groups: dict[str, list[tuple[float, int, Path]]] = {}
    for path in folder.glob("*.npz"):  # memory files and start states
        if path.name.startswith("."):  # a temporary another writer is filling
            continue
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile by another process
            continue
        groups.setdefault(_owner(path), []).append((stat.st_mtime, stat.st_size, path))
    total = sum(size for files in groups.values() for _, size, _ in files)

    def orphan(owner: str) -> bool:
        return not any(path.name == f"{owner}.npz" for _, _, path in groups[owner])

    # orphans first, then the least recently used (a group is as recent as its latest use)
    order = sorted(groups, key=lambda owner: (not orphan(owner), max(m for m, _, _ in groups[owner])))
    removed = []
    for owner in order:
        if total <= limit and not orphan(owner):
            break
        if owner == _owner(keep):  # the folder is keep's (checked above)
            continue
        for _, size, path in groups[owner]:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # not ours to remove (permissions): trimming never fails the write it follows
                continue
            total -= size
            removed.append(path)
    return removed
