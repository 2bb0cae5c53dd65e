"""Memory files: the compressed memory of a document, saved so a second question starts instantly.

The key hashes everything the memory depends on: the base model and UIO head (their fingerprints),
the segment length, the ratio and the tokens compressed. The file holds K (before RoPE) and V of each
segment and a checksum over them; a damaged or foreign file is detected and the memory recomputed.
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from uio_gguf.cache import cache_root
from uio_gguf.encoder import SegmentMemory
from uio_gguf.files import atomic_file

FORMAT = "uio-memory/1"


def cache_dir() -> Path:
    return cache_root() / "memory"


def memory_key(bundle, tokens: np.ndarray) -> str:
    digest = hashlib.sha256()
    for part in (bundle.model_fingerprint, bundle.head_fingerprint, str(bundle.segment), str(bundle.ratio)):
        digest.update(part.encode() + b"\0")
    digest.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def _checksum(k: np.ndarray, v: np.ndarray) -> str:
    return hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest()


def save(path: Path, key: str, memory: SegmentMemory, dtype=np.float16) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k, v = memory.k.astype(dtype), memory.v.astype(dtype)
    meta = json.dumps({"format": FORMAT, "key": key, "checksum": _checksum(k, v)})
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, k=k, v=v, meta=np.array(meta))
    return path


def load(path: Path, key: str) -> SegmentMemory | None:
    """The memory in `path` if it is intact and made for `key`; None (with a warning if damaged) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            k, v = data["k"], data["v"]
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        if meta.get("key") != key:
            return None  # another document or bundle: not an error, just not ours
        if meta.get("checksum") != _checksum(k, v):
            raise ValueError("checksum mismatch")
    except Exception as err:  # any damage: truncated zip, bad JSON, wrong arrays
        warnings.warn(f"memory file {path} is damaged ({err}); recomputing", stacklevel=2)
        return None
    return SegmentMemory(k.astype(np.float32), v.astype(np.float32))
