"""Reading the user's document: a clear error for what is not text, a warning for what is nearly text."""

from __future__ import annotations

import warnings
from pathlib import Path

from uio_gguf.errors import UIOError


def read_book(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UIOError(f"book not found: {path}")
    if not path.is_file():
        raise UIOError(f"not a file: {path}")
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise UIOError(f"{path} looks like a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        warnings.warn(
            f"{path} is not valid UTF-8 (first bad byte at offset {err.start}); undecodable bytes were replaced",
            stacklevel=2,
        )
        text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise UIOError(f"{path} is empty")
    return text
