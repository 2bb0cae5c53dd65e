"""Helpers the tests share (fixtures live in conftest.py): running the command line, llama.cpp's own
logits, a checkpoint's weights, a tiny training run, the settings of the shared tiny runtimes, and an
app served on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from uio_gguf.text.packaged import DEMO_QUESTION

REPO = Path(__file__).resolve().parent.parent

# The tiny f32 LLaMA runtime of the recall tests (conftest's `runtime`): segment 16, ratio 4, a book with
# the demo's planted sentence (conftest's `planted_book`) and its question.
SEGMENT, RATIO = 16, 4
SLOTS = SEGMENT // RATIO
PLANTED = "The access code of the archive is 7419."
QUESTION = DEMO_QUESTION
# The crops of the retrieval and chat-recall tests: CROP_SEGMENTS segments of CROP_SEGMENT tokens.
CROP_SEGMENT, CROP_SEGMENTS = 128, 3


def rel_diff(a, b) -> float:
    """|a - b| / |b| of two flat gradients."""
    return ((a - b).norm() / b.norm()).item()


def tiny_model_and_crop(segments: int, segment: int = 16, ratio: int = 4, batch: int = 2):
    """The estimator tests' tiny random UIO model and a crop of `segments` segments of random tokens."""
    import torch

    from uio_gguf.train.estimators import Crop
    from uio_gguf.train.tiny import tiny_uio

    tokens = torch.randint(0, 256, (batch, segments * segment + 1), generator=torch.Generator().manual_seed(0))
    return tiny_uio(segment=segment, ratio=ratio), Crop(tokens, segment)


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


def checkpoint_weights(checkpoint) -> dict:
    """Every trained tensor of a checkpoint (the encoder and transfer adapters, the memory embedding),
    keyed 'file:tensor'."""
    from safetensors.torch import load_file

    return {
        f"{name}:{key}": value
        for name in (
            "encoder/adapter_model.safetensors",
            "transfer/adapter_model.safetensors",
            "memory_embedding.safetensors",
        )
        for key, value in load_file(str(checkpoint / name)).items()
    }


def train_run(
    model_dir, out, *extra, data=None, check=True, shape=(CROP_SEGMENT, 32, CROP_SEGMENTS), lr=None, eval_every=100
):
    """A tiny `uio-gguf train` run: shape (segment, ratio, segments a crop), by default the retrieval and
    chat-recall crops'; data None leaves out --data (the run reads OUT/tokens.npz)."""
    segment, ratio, segments = shape
    data_args = ("--data", str(data)) if data is not None else ()
    lr_args = ("--lr", str(lr)) if lr is not None else ()
    return run_cli(
        "train",
        "--base",
        str(model_dir),
        *data_args,
        "--out",
        str(out),
        "--segment",
        str(segment),
        "--ratio",
        str(ratio),
        "--segments",
        str(segments),
        "--batch",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        *lr_args,
        "--eval-every",
        str(eval_every),
        "--save-every",
        "1",
        *extra,
        check=check,
    )


def kv_positions(runtime, session):
    """The positions of the conversation's cells in a session's cache, sorted."""
    import numpy as np

    from uio_gguf.memory.session import DECODER_SEQ
    from uio_gguf.native.bindings import kv_read

    return np.sort(kv_read(runtime.plugin, session.ctx.ptr, session.layout, DECODER_SEQ)[0])


def assert_contiguous(runtime, session) -> None:
    import numpy as np

    from uio_gguf.memory.session import DECODER_SEQ

    assert np.array_equal(kv_positions(runtime, session), np.arange(session.n_past))
    assert session.ctx.seq_pos_max(DECODER_SEQ) == session.n_past - 1


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, tries: int = 600) -> None:
    """Waits until the server at `base` answers /health with 200 (0.1 s a try)."""
    import httpx

    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no server at {base}")


@contextmanager
def serving(app):
    """Runs the ASGI app in a uvicorn server on a free port of 127.0.0.1, in a thread of this process;
    yields its base URL once /health answers."""
    import uvicorn

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def cache_at(path):
    """Points the memory-file cache at `path` while the block runs."""
    before = os.environ.get("UIO_GGUF_CACHE")
    os.environ["UIO_GGUF_CACHE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["UIO_GGUF_CACHE"]
        else:
            os.environ["UIO_GGUF_CACHE"] = before
