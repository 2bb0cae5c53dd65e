"""uio-gguf: long-context memory for llama.cpp (UIO-LLMs).

    from uio_gguf import UIORuntime, Conversation, SamplingParams
    runtime = UIORuntime()                       # the embedded SmolLM2-135M bundle, or UIORuntime("bundle_dir")
    chat = Conversation(runtime, open("book.txt").read())
    for piece in chat.ask("Who wrote it?", SamplingParams()):
        print(piece, end="")

The public names load on first use, so `import uio_gguf` (and `uio-gguf --help`) stays instant.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "UIORuntime": "uio_gguf.runtime",
    "Conversation": "uio_gguf.chat",
    "Session": "uio_gguf.session",
    "SamplingParams": "uio_gguf.session",
    "Bundle": "uio_gguf.bundle",
    "SegmentMemory": "uio_gguf.encoder",
    "UIOError": "uio_gguf.errors",
    "UIOLlama": "uio_gguf.llama_compat",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uio_gguf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
