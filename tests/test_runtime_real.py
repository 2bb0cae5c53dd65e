"""Decoder parity on the real embedded SmolLM2-135M (30 layers, GQA 9/3): dequantised into PyTorch with a
random non-zero UIO adapter, converted to an f32 bundle, run through the llama.cpp runtime."""

from __future__ import annotations

import numpy as np
import pytest

from tests.uio_reference import kl, torch_stream_logits

pytestmark = pytest.mark.slow
SEGMENT = 64  # the smollm2 fixture's UIO config: segment 64, ratio 8 (8 slots)


# f32 cache: float32 rounding only, so a max-error bound too; f16 cache: rounding of K/V to 11 bits
# moves a few logits by O(1) on this 30-layer model, so the bound there is top-1 and KL (the issue's).
@pytest.mark.parametrize("kv_type, bound", [("f32", 1e-3), ("f16", None)])
def test_real_model_decoder_logits_equal_pytorch(smollm2, smollm2_f32_bundle, prose, kv_type, bound):
    from uio_gguf.memory.runtime import UIORuntime

    model, tokenizer, _ = smollm2
    stream = np.asarray(tokenizer(prose[:3000], add_special_tokens=False)["input_ids"][: 4 * SEGMENT + 20], np.int32)
    expected = torch_stream_logits(model, stream, SEGMENT)
    runtime = UIORuntime(smollm2_f32_bundle, kv_type=kv_type)
    got = runtime.new_session(n_ctx=1024).feed(stream, all_logits=True)
    top1 = (got.argmax(-1) == expected.argmax(-1)).mean()
    mean_kl = kl(expected, got).mean()
    err = np.abs(got - expected).max()
    print(
        f"SmolLM2 runtime vs PyTorch ({kv_type} cache): top-1 {top1:.2%}, mean KL {mean_kl:.2e}, max |dlogit| {err:.2e}"
    )
    assert top1 >= 0.99 and mean_kl <= 1e-3
    if bound is not None:
        assert err < bound * np.abs(expected).max()


def test_encoder_formats_on_the_q4_1_file_against_pytorch(smollm2, smollm2_f32_bundle, embedded_gguf, prose, tmp_path):
    """The smollm2 head over the embedded Q4_1 file itself (PyTorch holds its weights dequantised): the
    encoder on the Q4_1 file and on its F16 copy (uio_gguf/format/derived.py), against PyTorch's h_mem, and
    the decoder's logits (on the Q4_1 file, f16 cache) over the memory each made."""
    import os
    import shutil

    from tests.uio_reference import torch_memory
    from uio_gguf.format import schema
    from uio_gguf.format.bundle import Bundle
    from uio_gguf.memory.runtime import UIORuntime

    model, tokenizer, _ = smollm2
    bundle = tmp_path / "q4_1"
    bundle.mkdir()
    for name in (schema.ENCODER_FILE, schema.HEAD_FILE):
        shutil.copyfile(smollm2_f32_bundle / name, bundle / name)
    os.symlink(embedded_gguf, bundle / schema.MODEL_FILE)
    stream = np.asarray(tokenizer(prose[:3000], add_special_tokens=False)["input_ids"][: 4 * SEGMENT + 20], np.int32)
    segments = stream[: 4 * SEGMENT].reshape(4, SEGMENT)
    expected_h = torch_memory(model, segments).numpy()
    expected = torch_stream_logits(model, stream, SEGMENT)
    found = {}
    for fmt in ("q4_1", "f16"):
        with UIORuntime(Bundle.open(bundle, check=False), encoder_format=fmt) as runtime:
            h = runtime.encoder.compress(segments, keep_states=True).h
            with runtime.new_session(n_ctx=1024) as session:
                got = session.feed(stream, all_logits=True)
        h_err = float(np.abs(h - expected_h).mean() / np.abs(expected_h).mean())
        found[fmt] = (h_err, float((got.argmax(-1) == expected.argmax(-1)).mean()), float(kl(expected, got).mean()))
        print(
            f"encoder on {fmt}: h_mem mean rel. error {h_err:.2e}, logits top-1 {found[fmt][1]:.2%}, KL {found[fmt][2]:.2e}"
        )
    assert found["f16"][0] < found["q4_1"][0]  # the F16 kernels keep activations in fp16, Q4_1's round them to 8 bits
    assert found["f16"][1] >= found["q4_1"][1] - 0.02 and found["f16"][2] <= 2 * found["q4_1"][2] + 1e-3
