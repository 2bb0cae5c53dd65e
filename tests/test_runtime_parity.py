"""The heart of the project: the llama.cpp runtime computes what the PyTorch UIO model computes.

A tiny random LLaMA (and Qwen2) with non-zero random UIO weights (encoder LoRA, transfer LoRA, memory
embedding), converted to an f32 bundle, over a real text of 6 full segments and a remainder. The KV
cache is f32 here, so the only differences are float32 rounding in two different kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.uio_reference import kl as _kl
from tests.uio_reference import torch_memory as _torch_memory


def _torch_stream_logits(model, stream):
    from tests.uio_reference import torch_stream_logits

    return torch_stream_logits(model, stream, SEGMENT)


SEGMENT, RATIO = 16, 4
SLOTS = SEGMENT // RATIO
N_SEGMENTS = 6


def _hf_to_llama_rows(x: np.ndarray, head_dim: int) -> np.ndarray:
    """The converter's LLaMA Q/K row permutation, on the last axis of HF-layout rows:
    per head, llama[2j] = hf[j], llama[2j+1] = hf[j + head_dim/2]."""
    shape = x.shape
    heads = x.reshape(*shape[:-1], -1, 2, head_dim // 2)  # (.., n_heads, half-block, j)
    return np.swapaxes(heads, -1, -2).reshape(shape)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, make_tiny_bundle, prose):
    from uio_gguf.memory.runtime import UIORuntime

    bundle_dir, model, tokenizer = make_tiny_bundle(arch=request.param, segment=SEGMENT, ratio=RATIO, outtype="f32")
    ids = tokenizer(prose[:4000], add_special_tokens=False)["input_ids"]
    stream = np.asarray(ids[: N_SEGMENTS * SEGMENT + 7], dtype=np.int32)
    runtime = UIORuntime(bundle_dir, kv_type="f32", segments_per_batch=4)
    return request.param, runtime, model, stream


def test_captured_memory_equals_pytorch(setup):
    arch, runtime, model, stream = setup
    segments = stream[: N_SEGMENTS * SEGMENT].reshape(N_SEGMENTS, SEGMENT)
    ours = runtime.encoder.compress(segments, keep_states=True)
    h_ref = _torch_memory(model, segments)
    # h_mem: every layer, every slot
    assert ours.h.shape == tuple(h_ref.shape)
    err_h = np.abs(ours.h - h_ref.numpy()).max()
    assert err_h < 1e-4 * max(1.0, np.abs(h_ref.numpy()).max()), err_h
    # K_mem (rotated at memory positions 0..k-1) and V_mem, segment by segment
    head_dim = runtime.model.head_dim
    for s in range(N_SEGMENTS):
        with torch.no_grad():
            ref = model.memory_kv(h_ref[s : s + 1])  # per layer (1, n_kv_heads, k, head_dim), K rotated
        k_ref = np.stack([k[0].transpose(0, 1).reshape(SLOTS, -1).numpy() for k, _ in ref])
        v_ref = np.stack([v[0].transpose(0, 1).reshape(SLOTS, -1).numpy() for _, v in ref])
        if arch == "llama":
            k_ref = _hf_to_llama_rows(k_ref, head_dim)
        k_ours = runtime.rope.rotate(ours.k[s], np.arange(SLOTS))
        assert np.abs(k_ours - k_ref).max() < 1e-4 * max(1.0, np.abs(k_ref).max()), (s, np.abs(k_ours - k_ref).max())
        assert np.abs(ours.v[s] - v_ref).max() < 1e-4 * max(1.0, np.abs(v_ref).max())


def test_decoder_logits_equal_pytorch_for_every_token(setup):
    _, runtime, model, stream = setup
    expected = _torch_stream_logits(model, stream)
    session = runtime.new_session(n_ctx=512)
    got = session.feed(stream, all_logits=True)
    assert got.shape == expected.shape
    top1 = (got.argmax(-1) == expected.argmax(-1)).mean()
    kl = _kl(expected, got).mean()
    print(f"decoder parity: top-1 {top1:.4f}, mean KL {kl:.2e}, max |dlogit| {np.abs(got - expected).max():.2e}")
    assert top1 >= 0.99 and kl <= 1e-3
    assert np.abs(got - expected).max() < 1e-3  # f32 cache: float32 rounding only
    assert session.compressed_segments == N_SEGMENTS


def test_memory_actually_matters(setup):
    """A guard on the test above: without memory the later windows' logits differ."""
    _, runtime, model, stream = setup
    with torch.no_grad():
        plain = model.decode(torch.as_tensor(stream[3 * SEGMENT : 4 * SEGMENT], dtype=torch.long)[None], None)[
            0
        ].numpy()
    expected = _torch_stream_logits(model, stream)[3 * SEGMENT : 4 * SEGMENT]
    assert np.abs(plain - expected).max() > 1e-2


def test_streaming_one_token_at_a_time_across_boundaries(setup):
    _, runtime, model, stream = setup
    part = stream[: 2 * SEGMENT + 6]  # crosses two compression boundaries
    expected = _torch_stream_logits(model, part)
    session = runtime.new_session(n_ctx=256)
    got = np.stack([session.feed([t]) for t in part])
    assert session.compressed_segments == 2
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
    assert np.abs(got - expected).max() < 1e-3


def test_preloaded_memory_equals_compressing_while_feeding(setup):
    """The chat path (compress the book's full segments, write them, feed the rest) and the streaming
    path (feed everything) see the same thing."""
    _, runtime, _, stream = setup
    n_full = len(stream) // SEGMENT
    fed = runtime.new_session(n_ctx=256)
    all_fed = fed.feed(stream, all_logits=True)
    pre = runtime.new_session(n_ctx=256)
    pre.add_memory(runtime.compress(stream))
    rest = pre.feed(stream[n_full * SEGMENT :], all_logits=True)
    assert np.abs(rest - all_fed[n_full * SEGMENT :]).max() < 1e-4


def test_parallel_batches_equal_one_segment_at_a_time(setup):
    from uio_gguf.memory.encoder import Encoder

    _, runtime, _, stream = setup
    segments = stream[: N_SEGMENTS * SEGMENT].reshape(N_SEGMENTS, SEGMENT)
    batched = runtime.encoder.compress(segments)  # 4 per batch: batches of 4 and 2
    single = Encoder(
        runtime.model, runtime.bundle, runtime.plugin, segments_per_batch=1, kv_type=runtime.kv_type
    ).compress(segments)
    assert np.abs(batched.k - single.k).max() < 1e-5
    assert np.abs(batched.v - single.v).max() < 1e-5


def test_flash_attention_on_and_off_agree(setup):
    from uio_gguf.memory.runtime import UIORuntime

    _, runtime, _, stream = setup
    flash = UIORuntime(runtime.bundle, kv_type="f32", flash_attn=True)
    off = runtime.new_session(n_ctx=256).feed(stream, all_logits=True)
    on = flash.new_session(n_ctx=256).feed(stream, all_logits=True)
    assert (on.argmax(-1) == off.argmax(-1)).mean() >= 0.99
    assert np.abs(on - off).max() < 1e-3
