"""Checksums of whole files (sha256 of every byte), each computed once per (path, size, mtime).

A bundle's base model may be several GB: it is read in full the first time a bundle uses it, and the
result is kept in the cache folder (digests/), so a later run reads one small file. A file changed in place
has another size or mtime and is read again. Without a usable cache the checksum is simply computed each time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from uio_gguf.atomic import atomic_file
from uio_gguf.cache import cache_root
from uio_gguf.errors import UIOError

CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path) -> str:
    """ "sha256:<hex>" of every byte of the file (uncached: the converter hashes what it just wrote)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """file_sha256, read from the cache when this (path, size, mtime) was hashed before."""
    path = Path(path).resolve()
    stat = path.stat()
    name = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    try:
        entry = cache_root() / "digests" / f"{name}.txt"
    except UIOError:  # no usable cache folder
        return file_sha256(path)
    try:
        known = entry.read_text().strip() if entry.is_file() else ""
    except OSError:
        known = ""
    if known.startswith("sha256:") and len(known) == 7 + 64:
        return known
    value = file_sha256(path)
    try:
        with atomic_file(entry) as tmp:
            tmp.write_text(value + "\n")
    except OSError:  # a full or read-only cache: hashed again next time
        pass
    return value
