"""Keyed cache files: an .npz of arrays plus a meta record of what they are (format), what they were
made for (key) and a checksum over them (or none: the zip's CRC-32 of each array), written atomically.

Memory files (uio_gguf.store.memory_file) and start states (uio_gguf.store.start_state) are both kept this way;
a memory file checks its own SHA-256 over K and V, a start state the zip's CRC-32 alone (its state is
read once, in the first question's time). A file written into the memory cache keeps that folder under
its size limit; a file read is marked used (uio_gguf/cache.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from uio_gguf.atomic import atomic_file
from uio_gguf.cache import mark_used, trim_memory_dir


def save(path: Path, format: str, key: str, checksum: str | None, **arrays: np.ndarray) -> None:
    """checksum: the owner's own over the arrays, or None where the zip's CRC-32 (checked by np.load as it
    reads an array) is guard enough."""
    meta = json.dumps({"format": format, "key": key, "checksum": checksum})
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, meta=np.array(meta), **arrays)
    trim_memory_dir(keep=path)


def _open(path: Path):
    """np.load on a regular file only: a FIFO in the cache would block the read for ever, a directory or a
    device fail in their own ways. Raises ValueError for anything else."""
    if not Path(path).is_file():
        raise ValueError("not a regular file")
    return np.load(path, allow_pickle=False)


def read_meta(path: Path) -> dict:
    """The meta record alone (the arrays stay on disk). Raises on a missing, unreadable or non-regular file."""
    with _open(path) as data:
        return json.loads(str(data["meta"]))


def load(path: Path, format: str, key: str, names: tuple[str, ...]) -> tuple[str, dict[str, np.ndarray]] | None:
    """(the recorded checksum, the named arrays) of a file made for `key`; None for another key.
    Raises on a damaged file (truncated zip, bad JSON, a missing array, another format) or a non-regular one."""
    with _open(path) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in names}
    if meta.get("format") != format:
        raise ValueError(f"unknown format {meta.get('format')!r}")
    if meta.get("key") != key:
        return None  # another document or bundle: not an error, just not ours
    mark_used(path)
    return meta.get("checksum"), arrays
