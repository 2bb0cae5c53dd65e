"""What the converter must know per architecture: llama.cpp's name for it, how llama.cpp rotates Q/K,
and the Q/K row permutation that goes with it (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.format import schema


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    rope_type: str  # schema.ROPE_NORM or schema.ROPE_NEOX: what llama.cpp applies to this architecture
    permute_qk: bool  # rows of W_Q / W_K (and of LoRA B, biases) reordered for NORM rope on adjacent pairs

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


LLAMA = Arch(gguf.MODEL_ARCH.LLAMA, schema.ROPE_NORM, permute_qk=True)
QWEN2 = Arch(gguf.MODEL_ARCH.QWEN2, schema.ROPE_NEOX, permute_qk=False)
# Hugging Face model_type -> llama.cpp architecture (Mistral is LLaMA in llama.cpp).
BY_MODEL_TYPE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": QWEN2}
BY_GGUF_NAME = {arch.name: arch for arch in (LLAMA, QWEN2)}


def arch_of_config(config) -> Arch:
    arch = BY_MODEL_TYPE.get(config.model_type)
    if arch is None:
        raise UIOError(
            f"unsupported architecture '{config.model_type}' (the converter handles {', '.join(BY_MODEL_TYPE)})"
        )
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window is not None and window < config.max_position_embeddings:
        # llama.cpp's LLaMA graph has no sliding window: the two would disagree past `window` tokens.
        raise UIOError(f"Mistral with a sliding window of {window} tokens is not supported")
    return arch


def arch_of_gguf(name: str | None) -> Arch:
    arch = BY_GGUF_NAME.get(name or "")
    if arch is None:
        raise UIOError(f"unsupported architecture '{name}' (the converter handles {', '.join(BY_GGUF_NAME)})")
    return arch


def head_counts(config) -> dict[str, int]:
    """Heads per projection: the row permutation works head by head."""
    n_head = config.num_attention_heads
    return {"attn_q": n_head, "attn_k": getattr(config, "num_key_value_heads", None) or n_head}


def llama_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """The LLaMA Q/K row permutation on axis 0 of a weight (n_out, n_in), a LoRA B (n_out, r) or a bias
    (n_out,): per head, row 2j <- row j and row 2j+1 <- row j + head_dim/2, so that HF's rotation of the
    two halves becomes llama.cpp's rotation of adjacent pairs."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_rows: llama.cpp's adjacent-pair row order back to Hugging Face's halves."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def to_llama_layout(arch: Arch, config, proj: str, rows: np.ndarray) -> np.ndarray:
    """Rows of projection `proj` ("attn_q", "attn_k", "attn_v", ...) as llama.cpp expects them."""
    if arch.permute_qk and proj in ("attn_q", "attn_k"):
        return llama_rows(rows, head_counts(config)[proj])
    return rows


def from_llama_layout(arch: Arch, config, proj: str, rows: np.ndarray) -> np.ndarray:
    """The inverse of to_llama_layout: rows of `proj` as Hugging Face (and training) hold them."""
    if arch.permute_qk and proj in ("attn_q", "attn_k"):
        return hf_rows(rows, head_counts(config)[proj])
    return rows
