"""Shared fixtures: the embedded SmolLM2 GGUF, its tokenizer, and tiny random HF models built from a
config (fixed seed) that use that real tokenizer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    from uio_gguf.embedded import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, embedded_gguf) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """make_tiny_model_dir(arch, seed) -> a HF directory: a tiny random model and the SmolLM2 tokenizer."""
    made: dict = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in made:
            from train.tiny import tiny_base

            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_base(arch, vocab_size=49152, seed=seed, **overrides).save_pretrained(out)
            for item in tokenizer_dir.iterdir():
                shutil.copy(item, out / item.name)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def prose() -> str:
    from train.corpus import stdlib_prose

    return stdlib_prose()


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `uio-gguf ARGS` in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, "-c", "from uio_gguf.cli import main; main()", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"uio-gguf {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result
