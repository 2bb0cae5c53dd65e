"""The converter's output computes what the Hugging Face model computes, in stock llama.cpp.

Tiny random LLaMA and Qwen2 models (vocabulary 49152 with the SmolLM2 tokenizer; Qwen2 with random
q/k/v biases), fixed seeds, a real English paragraph. f32 weights and an f32 KV cache leave only float32
rounding in two different kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import llama_logits

N_TOKENS = 32
F32_BOUND = 1e-4  # max |logit difference|: float32 rounding (observed ~4e-7 on logits of magnitude ~1)


@pytest.fixture(scope="module")
def tokens(make_tiny_bundle, prose) -> list[int]:
    _, _, tokenizer = make_tiny_bundle("llama")
    return tokenizer(prose[:2000], add_special_tokens=False)["input_ids"][:N_TOKENS]


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits of the UIO model's base (adapters off, as outside the encoder pass)."""
    with torch.no_grad():
        return model.base(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_model_gives_the_hf_logits(arch, make_tiny_bundle, tokens):
    bundle, model, _ = make_tiny_bundle(arch, outtype="f32")
    ours = llama_logits(bundle / "model.gguf", tokens)
    ref = hf_logits(model, tokens)
    err = np.abs(ours - ref).max()
    print(f"{arch} f32: max |dlogit| = {err:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert err < F32_BOUND


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_encoder_adapter_gives_the_peft_logits(arch, make_tiny_bundle, make_tiny_checkpoint, tokens):
    """encoder.lora.gguf in llama.cpp (llama_adapter_lora_init + llama_set_adapters_lora) = the HF base
    with the checkpoint's encoder adapter loaded by PEFT; the adapter moves the logits far more than that."""
    from peft import PeftModel

    from uio_gguf.train.base import load_base
    from uio_gguf.train.checkpoint import read_config

    bundle, _, _ = make_tiny_bundle(arch, outtype="f32")
    checkpoint, _, _ = make_tiny_checkpoint(arch)
    base, _ = load_base(read_config(checkpoint)["base"]["path"])
    with torch.no_grad():
        plain = base(torch.tensor([tokens])).logits[0].numpy()
        ref = PeftModel.from_pretrained(base, checkpoint / "encoder")(torch.tensor([tokens])).logits[0].numpy()
    ours = llama_logits(bundle / "model.gguf", tokens, lora=bundle / "encoder.lora.gguf")
    err = np.abs(ours - ref).max()
    effect = np.abs(ref - plain).max()
    print(f"{arch} encoder LoRA: max |dlogit| = {err:.2e}, the adapter itself moves logits by {effect:.2f}")
    assert err < F32_BOUND
    assert effect > 1000 * F32_BOUND
