"""Start states: a book's decoder cache as the first question finds it, saved beside its memory file.

Opening a book from its memory file still writes every memory cell (K rotated to its position) and
decodes the raw remainder over all of them: 2-3 s for a 56K-token book's 7,056 cells on a 2-core CPU.
The start state is that finished cache (memory cells and remainder) as llama.cpp saves one sequence
(llama_state_seq_get_data), so reopening the book is a file read. Its key hashes the memory file's key
and everything else the cells depend on: the remainder's tokens, the raw window, the kept tokens, the
cache's types,
flash attention (it changes V's layout) and the llama-cpp-python version (the state format's owner).
The zip's CRC-32 of the state guards its bytes (np.load checks it as it reads them: no second pass over
the ~190 MB of a 56K book's state, which a SHA-256 took 0.09 s of the first question for); a damaged or
foreign file is ignored and the cache rebuilt the usual way.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from uio_gguf.store import keyed_file

FORMAT = "uio-start-state/1"


def state_key(
    memory_key: str, remainder, raw_window: int, keep: int, settings, memory_window: int | None = None
) -> str:
    """keep: the tokens kept raw in front of the memory; settings: the decoder context's ContextSettings;
    memory_window: the most memory cells the state holds (None: every segment's)."""
    import llama_cpp

    digest = hashlib.sha256()
    parts = (
        FORMAT,
        memory_key,
        raw_window,
        keep,
        settings.type_k,
        settings.type_v,
        settings.flash_attn,
        llama_cpp.__version__,
    )
    if memory_window is not None:  # (left out otherwise: the states saved before it keep their keys)
        parts += (f"memory_window={memory_window}",)
    for part in parts:
        digest.update(str(part).encode() + b"\0")
    digest.update(np.asarray(remainder, dtype=np.int32).tobytes())
    return digest.hexdigest()


def path_for(memory_path: Path, key: str) -> Path:
    """Beside its memory file and named after it: the cache keeps or drops the two together (uio_gguf/cache.py)."""
    memory_path = Path(memory_path)
    return memory_path.with_name(f"{memory_path.stem}.{key}.start.npz")


def save(path: Path, key: str, state) -> None:
    """state: the bytes of llama_state_seq_get_data (any buffer)."""
    keyed_file.save(path, FORMAT, key, None, state=np.frombuffer(state, dtype=np.uint8))


def load(path: Path, key: str) -> np.ndarray | None:
    """The saved state's bytes if the file is intact and made for `key`; None otherwise (a warning if damaged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        found = keyed_file.load(path, FORMAT, key, ("state",))
        if found is None:
            return None
        _, arrays = found
        blob = arrays["state"]  # read through the zip's CRC check: a changed byte raises BadZipFile
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError("the state is not a byte string")
    except Exception as err:  # truncated zip, a bad CRC, bad JSON, wrong arrays
        warnings.warn(f"start state {path} is damaged ({err}); rebuilding it", stacklevel=2)
        return None
    return blob
