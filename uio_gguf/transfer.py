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

ENCODER, TRANSFER = "encoder", "transfer"


class TransferHead:
    def __init__(self, bundle):
        self.n_layer = bundle.n_layer
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
        for L in range(self.n_layer):
            k[L] = kcur[L] + self._delta(h[L], self.k_transfer[L])
            v[L] = vcur[L] - self._delta(h[L], self.v_encoder[L]) + self._delta(h[L], self.v_transfer[L])
        return k, v
