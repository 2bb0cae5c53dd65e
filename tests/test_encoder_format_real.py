"""The encoder's weight formats on the embedded SmolLM2 (Q4_1) with the shipped r8 head: the F16 copy
holds the Q4_1 weights dequantised (what the heads were trained on, train/base.py) to fp16 rounding, the
Q8_0 and Q4_0 requantisations do not; and the memory each format makes, against the Q4_1 path's, as the
decoder reads it: top-1 agreement and KL of the next-token distributions, and perplexity with memory."""

from __future__ import annotations

import numpy as np
import pytest

from tests.uio_reference import kl

pytestmark = pytest.mark.slow
FORMATS = ("q4_1", "f16", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    import os

    from uio_gguf.format.shipped import default_bundle_path

    os.environ.setdefault("UIO_GGUF_CACHE", str(tmp_path_factory.mktemp("cache")))
    return default_bundle_path(8)


def test_f16_holds_the_q4_1_weights_to_fp16_rounding_and_requantisations_do_not(shipped):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from uio_gguf.format import derived, schema

    source = shipped / schema.MODEL_FILE
    names = ("blk.0.attn_q.weight", "blk.17.ffn_down.weight", "blk.29.attn_v.weight")

    def weights(path):
        tensors = {t.name: t for t in GGUFReader(path).tensors if t.name in names}
        return {n: dequantize(tensors[n].data, tensors[n].tensor_type).astype(np.float64) for n in names}

    trained = weights(source)  # the Q4_1 weights dequantised, as PyTorch trained the heads on them
    worst = {}
    for fmt in FORMATS[1:]:
        copy = weights(derived.weights_path(source, fmt))
        # error per element in units of fp16's rounding step of the trained weight (half an ulp at most)
        ulp = {n: np.spacing(np.abs(trained[n]).astype(np.float16)).astype(np.float64) for n in names}
        worst[fmt] = max(float((np.abs(copy[n] - trained[n]) / np.maximum(ulp[n], 2**-24)).max()) for n in names)
    print("largest weight error, in fp16 steps of the trained weight:", worst)
    assert worst["f16"] <= 0.5 + 1e-6  # round to nearest: within fp16 error
    assert worst["q8_0"] > 1 and worst["q4_0"] > 1  # a second quantisation moves them further


@pytest.fixture(scope="module")
def per_format(shipped, prose):
    """format -> (the decoder's logits over a held-out stream after the memory of the text before it,
    the memory's K). The same tokens, cache and decoder (the model file) for every format."""
    from uio_gguf.memory.runtime import UIORuntime

    out = {}
    for fmt in FORMATS:
        with UIORuntime(shipped, encoder_format=fmt) as rt:
            seg = rt.segment
            tokens = rt.model.tokenize(prose[:40_000], add_special=False)
            book, stream = tokens[: 16 * seg], tokens[16 * seg : 18 * seg]
            memory = rt.compress(book)
            with rt.new_session(n_ctx=2048) as s:
                s.add_memory(memory)
                logits = s.feed(stream, all_logits=True)
            out[fmt] = (logits, memory.k, np.asarray(stream))
    return out


def test_memory_of_each_format_against_the_q4_1_path(per_format):
    reference, ref_k, stream = per_format["q4_1"]
    rows = []
    for fmt in FORMATS:
        logits, k, _ = per_format[fmt]
        top1 = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        mean_kl = float(kl(reference, logits).mean())
        # perplexity of the stream's next tokens given the memory and the raw tokens before them
        logp = logits[:-1] - np.logaddexp.reduce(logits[:-1].astype(np.float64), axis=-1, keepdims=True)
        ppl = float(np.exp(-logp[np.arange(len(stream) - 1), stream[1:]].mean()))
        k_rel = float(np.abs(k - ref_k).mean() / np.abs(ref_k).mean())
        rows.append((fmt, top1, mean_kl, ppl, k_rel))
    print("\nformat | top-1 vs q4_1 | mean KL vs q4_1 | perplexity with memory | mean |dK| / mean |K|")
    for fmt, top1, mean_kl, ppl, k_rel in rows:
        print(f"{fmt} | {top1:.2%} | {mean_kl:.2e} | {ppl:.3f} | {k_rel:.2e}")
    found = {fmt: (top1, mean_kl, ppl) for fmt, top1, mean_kl, ppl, _ in rows}
    assert found["q4_1"][:2] == (1.0, 0.0)
    top1, mean_kl, ppl = found["f16"]
    # the memory moves with the encoder's arithmetic (Q4_1's kernels round activations to 8 bits, F16's to
    # fp16), and the decoder reads it the same: as the parity tests bound llama.cpp against PyTorch
    assert top1 >= 0.95 and mean_kl <= 1e-2, (top1, mean_kl)
    assert abs(ppl / found["q4_1"][2] - 1) < 0.02
