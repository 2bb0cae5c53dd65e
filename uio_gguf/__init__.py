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
    "UIORuntime": "uio_gguf.memory.runtime",
    "Conversation": "uio_gguf.chat.conversation",
    "Session": "uio_gguf.memory.session",
    "SamplingParams": "uio_gguf.llamacpp.sampling",
    "Bundle": "uio_gguf.format.bundle",
    "SegmentMemory": "uio_gguf.memory.encoder",
    "UIOError": "uio_gguf.errors",
    "UIOLlama": "uio_gguf.serve.engine",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uio_gguf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
