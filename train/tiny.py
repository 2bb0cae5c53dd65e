"""Tiny random LLaMA-family models built from a config (fixed seed): for tests, train-check and benchmarks."""

from __future__ import annotations

import torch

from uio_gguf.train.model import ENCODER, TRANSFER, UIOConfig, UIOModel


def tiny_base(
    arch: str = "llama",
    vocab_size: int = 256,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    eos_token_id: int = 2,
    **overrides,
):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        eos_token_id=eos_token_id,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown tiny architecture {arch}")
    model.eval()
    return model


def randomize_uio(model: UIOModel, seed: int = 0, scale: float = 0.05) -> UIOModel:
    """Non-zero adapters and a perturbed memory embedding, so that every gradient path is active."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_trainable_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
        model.memory_embedding.add_(torch.randn(model.memory_embedding.shape, generator=gen) * 0.5)
    return model


def tiny_uio(
    arch: str = "llama",
    segment: int = 16,
    ratio: int = 4,
    seed: int = 0,
    distinct_slots: bool = False,
    **base_overrides,
) -> UIOModel:
    base = tiny_base(arch, seed=seed, **base_overrides)
    torch.manual_seed(seed)
    model = UIOModel(base, UIOConfig(segment=segment, ratio=ratio, rank=4, alpha=8.0, distinct_slots=distinct_slots))
    return randomize_uio(model, seed)


__all__ = ["tiny_base", "tiny_uio", "randomize_uio", "ENCODER", "TRANSFER"]
