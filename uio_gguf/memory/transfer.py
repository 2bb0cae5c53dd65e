"""The transfer head: per layer, the memory slots' captured activations -> the K and V rows of memory.

docs/design.md §1: K_mem = h·(W_K + ΔW_K), V_mem = h·(W_V + ΔW_V) with the transfer LoRA deltas. The
encoder pass already computed h·W_K (Kcur; no encoder LoRA on K) and h·(W_V + ΔV_encoder) (Vcur) in
llama.cpp with the model's own weights, whatever their quantisation, so only low-rank terms are left:
  K_mem = Kcur + ΔK_transfer(h)
  V_mem = Vcur − ΔV_encoder(h) + ΔV_transfer(h)
with Δ(h) = scale · (h Aᵀ) Bᵀ. K_mem is returned before RoPE (rope.py rotates it at its position).
"""

from __future__ import annotations

import numpy as np

from uio_gguf.errors import UIOError

ENCODER, TRANSFER = "encoder", "transfer"
# What a memory file stores K and V in (uio_gguf/store/memory_file.py) by default: the f16 of llama.cpp's
# default KV cache. Every memory is rounded to its dtype here, the one place memory is made, so a fresh
# compression injects exactly what its memory file gives back: compress once and ask many answers as
# compressing again would (bit-identical logits). An f32 KV cache keeps f32 memory (and f32 files).
MEMORY_DTYPE = np.float16


class TransferHead:
    def __init__(self, bundle, memory_dtype=MEMORY_DTYPE):
        self.n_layer = bundle.n_layer
        self.memory_dtype = np.dtype(memory_dtype)
        # (A, B, scale) per layer, loaded once: the adapters are small (rank × d per projection).
        self.k_transfer = [bundle.lora(TRANSFER, "attn_k", L) for L in range(self.n_layer)]
        self.v_transfer = [bundle.lora(TRANSFER, "attn_v", L) for L in range(self.n_layer)]
        self.v_encoder = [bundle.lora(ENCODER, "attn_v", L) for L in range(self.n_layer)]

    @staticmethod
    def _delta(h: np.ndarray, lora) -> np.ndarray:
        a, b, scale = lora
        return (h @ a.T) @ b.T * np.float32(scale)

    def apply(self, h: np.ndarray, kcur: np.ndarray, vcur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """h, kcur, vcur: (n_layer, n_rows, width) float32 -> (K_mem, V_mem) (n_layer, n_rows, width)."""
        k = np.empty_like(kcur)
        v = np.empty_like(vcur)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, in one line
            for L in range(self.n_layer):
                k[L] = kcur[L] + self._delta(h[L], self.k_transfer[L])
                v[L] = vcur[L] - self._delta(h[L], self.v_encoder[L]) + self._delta(h[L], self.v_transfer[L])
            k, v = round_memory(k, self.memory_dtype), round_memory(v, self.memory_dtype)
        if not (np.isfinite(k).all() and np.isfinite(v).all()):
            raise UIOError(
                "the UIO head made non-finite memory (past the range of f16, or NaN): the bundle's head is "
                "damaged or does not suit this model"
            )
        return k, v


def round_memory(x: np.ndarray, dtype=MEMORY_DTYPE) -> np.ndarray:
    """x rounded to dtype (what its memory file will hold), as float32."""
    return x.astype(dtype).astype(np.float32)
