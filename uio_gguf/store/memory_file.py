"""Memory files: the compressed memory of a document, saved so a second question starts instantly.

The key hashes everything the memory depends on: every byte of the base model, the encoder LoRA and the
UIO head (so a damaged file never reuses the memory made with the whole one), the segment length, the ratio
and the tokens compressed. The file holds K (before RoPE) and V of each
segment and a checksum over them; a damaged or foreign file is detected and the memory recomputed.
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from uio_gguf.cache import memory_dir
from uio_gguf.errors import UIOError
from uio_gguf.format.derived import MODEL
from uio_gguf.memory.encoder import SegmentMemory
from uio_gguf.memory.transfer import MEMORY_DTYPE
from uio_gguf.store import keyed_file

FORMAT = "uio-memory/1"


def path_for(key: str) -> Path:
    """Where the memory file of `key` lives: in the memory cache (its start states beside it)."""
    return memory_dir() / f"{key}.npz"


def memory_key(bundle, tokens: np.ndarray, dtype=MEMORY_DTYPE, weights: str = MODEL) -> str:
    """dtype: what the memory is made and stored in (the runtime's encoder.head.memory_dtype); an f32
    memory is another file than the f16 one (keys of f16 memory are as before it was a part). weights: the
    format the encoder ran on (the runtime's encoder_format, uio_gguf/format/derived.py): memory made on a
    derived copy of the weights is another memory ("model", the bundle's file as it is: keys as before)."""
    digest = hashlib.sha256()
    parts = (
        bundle.model_digest,
        bundle.encoder_digest,
        bundle.head_fingerprint,
        str(bundle.segment),
        str(bundle.ratio),
    )
    for part in parts:
        digest.update(part.encode() + b"\0")
    if np.dtype(dtype) != np.dtype(MEMORY_DTYPE):
        digest.update(np.dtype(dtype).name.encode() + b"\0")
    if weights != MODEL:
        digest.update(f"weights:{weights}".encode() + b"\0")
    digest.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def _checksum(k: np.ndarray, v: np.ndarray) -> str:
    """SHA-256 of K's bytes then V's (C order), read in place: no copy of a memory that may be 160 MB."""
    digest = hashlib.sha256()
    for array in (k, v):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def save(path: Path, key: str, memory: SegmentMemory, dtype=MEMORY_DTYPE) -> Path:
    """Writes the memory (K and V in `dtype`: MEMORY_DTYPE, what transfer.py rounds every memory to, so
    nothing is lost). A memory with non-finite values is refused, never saved."""
    path = Path(path)
    with np.errstate(over="ignore"):  # a value past dtype's range becomes inf, refused just below
        k, v = memory.k.astype(dtype), memory.v.astype(dtype)
    if not (np.isfinite(k).all() and np.isfinite(v).all()):
        raise UIOError("refusing to save a memory with non-finite values (the UIO head is damaged?)")
    keyed_file.save(path, FORMAT, key, _checksum(k, v), k=k, v=v)
    return path


def stored_checksum(path: Path, key: str) -> str | None:
    """The checksum a memory file records, read without its arrays (a start state names the memory it
    was made from by it); None if the file is missing, unreadable or made for another key."""
    try:
        meta = keyed_file.read_meta(path)
    except Exception:  # missing, truncated, not a zip: load() says which when it reads the file
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key:
        return None
    return meta.get("checksum")


def load(path: Path, key: str) -> SegmentMemory | None:
    """The memory in `path` if it is intact and made for `key`; None (with a warning if damaged) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        found = keyed_file.load(path, FORMAT, key, ("k", "v"))
        if found is None:
            return None
        checksum, arrays = found
        k, v = arrays["k"], arrays["v"]
        if checksum != _checksum(k, v):
            raise ValueError("checksum mismatch")
        if k.shape != v.shape or k.ndim != 4 or not (np.isfinite(k).all() and np.isfinite(v).all()):
            raise ValueError("K and V are not finite memory rows of one shape")
    except Exception as err:  # any damage: truncated zip, bad JSON, wrong arrays
        warnings.warn(f"memory file {path} is damaged ({err}); recomputing", stacklevel=2)
        return None
    return SegmentMemory(k.astype(np.float32), v.astype(np.float32))


def locate(runtime, tokens) -> tuple[str, Path]:
    """(key, path) of the memory file of `tokens` (whole segments) under the runtime's bundle, in the
    dtype its encoder makes memory in, on the weights its encoder runs on."""
    key = memory_key(runtime.bundle, tokens, runtime.encoder.head.memory_dtype, runtime.encoder_format)
    return key, path_for(key)


def load_or_compress(
    runtime, tokens, use_files: bool = True, compress=None, progress=None, write=None
) -> tuple[SegmentMemory, bool]:
    """The memory of `tokens` (whole segments): read from its memory file, or else made by `compress`
    (default runtime.compress; `progress` is passed on) and saved: through write(save, what, path) when
    given (Conversation: a disk that is full warns instead of failing). -> (memory, whether it was read)."""
    key, path = locate(runtime, tokens)
    memory = load(path, key) if use_files else None
    if memory is not None:
        return memory, True
    memory = (compress or runtime.compress)(tokens, progress=progress)
    if use_files and len(memory.k):
        dtype = runtime.encoder.head.memory_dtype
        (write or (lambda do, _what, _path: do()))(lambda: save(path, key, memory, dtype), "memory file", path)
    return memory, False
