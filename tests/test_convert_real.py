"""The converter on a real architecture: the embedded SmolLM2-135M (LLaMA, 30 layers, GQA 9/3, tied
embeddings), dequantised from its Q4_1 GGUF into PyTorch as training sees it, converted back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import llama_logits
from uio_gguf.format import schema
from uio_gguf.format.bundle import Bundle, gguf_fingerprint

pytestmark = pytest.mark.slow
N_TOKENS = 256


@pytest.fixture(scope="module")
def tokens(smollm2, prose) -> list[int]:
    return smollm2[1](prose, add_special_tokens=False)["input_ids"][:N_TOKENS]


def test_f32_conversion_chooses_the_tokens_of_the_original_q4_1(smollm2_f32_bundle, embedded_gguf, tokens):
    ours = llama_logits(smollm2_f32_bundle / schema.MODEL_FILE, tokens)
    original = llama_logits(embedded_gguf, tokens)
    agreement = (ours.argmax(-1) == original.argmax(-1)).mean()
    print(
        f"SmolLM2 f32 conversion vs original Q4_1 in llama.cpp: top-1 agreement {agreement:.1%} over {len(tokens)} tokens"
    )
    assert agreement >= 0.95


def test_f32_conversion_and_encoder_adapter_give_the_pytorch_logits(smollm2_f32_bundle, smollm2, tokens):
    """The dequantised weights are exact in f32, so llama.cpp and PyTorch agree to float32 rounding over
    30 layers, without and with the encoder LoRA."""
    model = smollm2[0]
    results = {}
    for adapter in (False, True):
        model._set_encoder_adapter(adapter)
        try:
            with torch.no_grad():
                ref = model.base(torch.tensor([tokens])).logits[0].numpy()
        finally:
            model._set_encoder_adapter(False)
        lora = smollm2_f32_bundle / schema.ENCODER_FILE if adapter else None
        ours = llama_logits(smollm2_f32_bundle / schema.MODEL_FILE, tokens, lora=lora)
        results[adapter] = (np.abs(ours - ref).max(), (ours.argmax(-1) == ref.argmax(-1)).mean(), np.abs(ref).max())
    print("SmolLM2 f32 vs PyTorch: max |dlogit|, top-1, max |logit| without / with encoder LoRA:", results)
    for err, agreement, scale in results.values():
        assert err < 1e-3 * scale and agreement >= 0.99


def test_tokenizer_is_copied_from_the_source_gguf(smollm2_f32_bundle, embedded_gguf):
    import gguf

    ours, original = gguf.GGUFReader(smollm2_f32_bundle / schema.MODEL_FILE), gguf.GGUFReader(embedded_gguf)
    keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and original.fields["tokenizer.ggml.pre"].contents() == "smollm"
    for key in keys:  # byte for byte: key, value type and value
        assert b"".join(map(bytes, ours.fields[key].parts)) == b"".join(map(bytes, original.fields[key].parts)), key


def test_base_gguf_is_used_as_it_is_after_the_fingerprint_check(smollm2, embedded_gguf, tmp_path, tokens):
    model, tokenizer, checkpoint = smollm2
    from uio_gguf.convert import convert_checkpoint

    bundle_dir = convert_checkpoint(
        checkpoint, tmp_path / "bundle", base_gguf=embedded_gguf, loaded=(model.base, tokenizer)
    )
    bundle = Bundle.open(bundle_dir)
    assert gguf_fingerprint(bundle.model_path) == gguf_fingerprint(embedded_gguf)
    assert bundle.info()["model_tensor_types"]["Q4_1"] == 210
    with_adapter = llama_logits(bundle.model_path, tokens[:32], lora=bundle.encoder_path)
    assert np.abs(with_adapter - llama_logits(bundle.model_path, tokens[:32])).max() > 0.1  # the adapter loads and acts


def test_fingerprint_of_a_real_model_is_stable(embedded_gguf):
    # Its speed is a benchmark's business, not a test's (docs/benchmarks.md).
    fingerprint = gguf_fingerprint(embedded_gguf)
    assert fingerprint.startswith("sha256:") and gguf_fingerprint(embedded_gguf) == fingerprint
