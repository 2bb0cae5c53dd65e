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
