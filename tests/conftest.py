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
    from uio_gguf.format.embedded import default_model_path

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

    def make(arch: str = "llama", seed: int = 0, random_biases: bool = False, **overrides) -> Path:
        """random_biases: the q/k/v biases (Qwen2 has them) drawn at random instead of HF's zeros."""
        key = (arch, seed, random_biases, tuple(sorted(overrides.items())))
        if key not in made:
            from uio_gguf.train.tiny import tiny_base

            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = tiny_base(arch, vocab_size=49152, seed=seed, **overrides)
            if random_biases:
                _randomize_biases(model, seed)
            model.save_pretrained(out)
            for item in tokenizer_dir.iterdir():
                shutil.copy(item, out / item.name)
            made[key] = out
        return made[key]

    return make


def _randomize_biases(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory, make_tiny_model_dir):
    """make_tiny_checkpoint(arch, seed, segment, ratio, ...) -> (checkpoint_dir, UIOModel, tokenizer): a UIO
    model over a tiny random base (Qwen2 with random q/k/v biases) with NON-ZERO random adapters and memory
    embedding, saved as train/loop.py saves it (base path and fingerprint recorded)."""
    made: dict = {}

    def make(
        arch: str = "llama",
        seed: int = 0,
        segment: int = 16,
        ratio: int = 4,
        rank: int = 4,
        alpha: float = 8.0,
        distinct_slots: bool = False,
    ):
        key = (arch, seed, segment, ratio, rank, alpha, distinct_slots)
        if key not in made:
            import torch

            from uio_gguf.train.base import fingerprint, load_base
            from uio_gguf.train.checkpoint import save_checkpoint
            from uio_gguf.train.model import UIOConfig, UIOModel
            from uio_gguf.train.tiny import randomize_uio

            model_dir = make_tiny_model_dir(arch, seed, random_biases=arch == "qwen2")
            base, tokenizer = load_base(model_dir)
            meta = {
                "estimator": "unbiased",
                "window": 2,
                "step": 7,
                "base": {
                    "path": str(model_dir.resolve()),
                    "model_type": base.config.model_type,
                    "fingerprint": fingerprint(base),
                },
            }
            torch.manual_seed(seed)
            config = UIOConfig(segment=segment, ratio=ratio, rank=rank, alpha=alpha, distinct_slots=distinct_slots)
            model = randomize_uio(UIOModel(base, config), seed)
            checkpoint = tmp_path_factory.mktemp(f"ckpt-{arch}") / "checkpoint"
            save_checkpoint(model, checkpoint, meta)
            made[key] = (checkpoint, model, tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def make_tiny_bundle(tmp_path_factory, make_tiny_checkpoint):
    """make_tiny_bundle(arch="llama", seed=0, segment=16, ratio=4, outtype="f32", ...) ->
    (bundle_dir, UIOModel, tokenizer): make_tiny_checkpoint's model converted by the converter."""
    made: dict = {}

    def make(arch: str = "llama", seed: int = 0, segment: int = 16, ratio: int = 4, outtype: str = "f32", **uio):
        key = (arch, seed, segment, ratio, outtype, tuple(sorted(uio.items())))
        if key not in made:
            from uio_gguf.convert import convert_checkpoint

            checkpoint, model, tokenizer = make_tiny_checkpoint(arch, seed, segment, ratio, **uio)
            bundle = convert_checkpoint(
                checkpoint, tmp_path_factory.mktemp(f"bundle-{arch}") / "bundle", outtype=outtype
            )
            made[key] = (bundle, model, tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def prose() -> str:
    from uio_gguf.train.corpus import stdlib_prose

    return stdlib_prose()


@pytest.fixture(scope="session")
def smollm2(embedded_gguf, tmp_path_factory):
    """(UIO model over the dequantised SmolLM2 with random non-zero adapters, tokenizer, its checkpoint).
    Loading takes ~40 s: every test of this module shares it."""
    import torch

    from uio_gguf.train.base import fingerprint, load_base
    from uio_gguf.train.checkpoint import save_checkpoint
    from uio_gguf.train.model import UIOConfig, UIOModel
    from uio_gguf.train.tiny import randomize_uio

    base, tokenizer = load_base(embedded_gguf)
    meta = {
        "estimator": "unbiased",
        "window": 2,
        "step": 3,
        "base": {"path": str(embedded_gguf), "model_type": base.config.model_type, "fingerprint": fingerprint(base)},
    }
    torch.manual_seed(0)
    model = randomize_uio(UIOModel(base, UIOConfig(segment=64, ratio=8, rank=8, alpha=16.0)), seed=0)
    checkpoint = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    save_checkpoint(model, checkpoint, meta)
    return model, tokenizer, checkpoint


@pytest.fixture(scope="session")
def smollm2_f32_bundle(smollm2, tmp_path_factory):
    model, tokenizer, checkpoint = smollm2
    from uio_gguf.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("smollm2-f32") / "bundle"
    return convert_checkpoint(checkpoint, out, outtype="f32", loaded=(model.base, tokenizer))


@pytest.fixture(scope="module")
def tiny_bundle(make_tiny_bundle) -> Path:
    """The tiny LLaMA bundle (segment 16, ratio 4, f32) that the CLI tests run on."""
    return make_tiny_bundle("llama", segment=16, ratio=4, outtype="f32")[0]


@pytest.fixture()
def cache_env(tmp_path) -> dict:
    """Environment for a CLI run with its own cache (memory files, assembled bundles)."""
    return {"UIO_GGUF_CACHE": str(tmp_path / "cache")}


def llama_logits(model_path, tokens, lora=None, kv_type: int = 0, n_threads: int = 2):
    """llama.cpp's logits (n_tokens, n_vocab) for one sequence, every position, through the low-level API:
    the model from model_path, optionally a LoRA adapter file (llama_adapter_lora_init +
    llama_set_adapters_lora, scale 1: llama.cpp applies alpha/rank itself), KV cache type kv_type
    (0 = GGML_TYPE_F32, 1 = F16), flash attention off."""
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import _logger

    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    from uio_gguf.llamacpp.api import model_params

    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params())
    assert model, f"llama.cpp could not load {model_path}"
    n = len(tokens)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = max(n, 32)
    params.type_k = params.type_v = kv_type
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_threads = params.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    adapter = None
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        assert ctx, "llama.cpp could not create a context"
        if lora is not None:
            adapter = llama_cpp.llama_adapter_lora_init(model, str(lora).encode())
            assert adapter, f"llama.cpp could not load the adapter {lora}"
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            assert llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) == 0
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(token), i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        if adapter:
            llama_cpp.llama_adapter_lora_free(adapter)
        llama_cpp.llama_model_free(model)


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `uio-gguf ARGS` in a fresh interpreter, as a user would."""
    result = subprocess.run(
        [sys.executable, "-c", "from uio_gguf.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"uio-gguf {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result
