"""Where uio-gguf keeps what it builds or computes once: $UIO_GGUF_CACHE, else $XDG_CACHE_HOME/uio-gguf,
else ~/.cache/uio-gguf. Subfolders: native/ (the compiled plugin), bundles/ (default bundles put
together), memory/ (memory files of compressed books)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("UIO_GGUF_CACHE"):
        return Path(os.environ["UIO_GGUF_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "uio-gguf"
    return Path.home() / ".cache" / "uio-gguf"
