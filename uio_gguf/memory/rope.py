"""Rotary position embedding of K, in llama.cpp's layout, for memory rows written into the cache.

K in llama.cpp's cache is post-RoPE. The memory's K rows are made outside the graph (captured Kcur plus
the transfer-head delta), so they are rotated here, at their memory positions, the way llama.cpp
rotates the model's own keys:
  norm : adjacent pairs (x[2i], x[2i+1])           LLaMA (the converter permuted W_K's rows for this)
  neox : halves (x[i], x[i + n_rot/2])              Qwen2
theta_i = pos · freq_scale · base^(-2i / n_rot); dimensions past n_rot are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import Keys

from uio_gguf.errors import UIOError
from uio_gguf.format import schema


@dataclass(frozen=True)
class Rope:
    kind: str  # schema.ROPE_NORM or schema.ROPE_NEOX
    head_dim: int
    n_rot: int
    base: float
    freq_scale: float = 1.0

    @classmethod
    def from_model(cls, model, kind: str) -> Rope:
        """Reads the RoPE settings from the base model's GGUF metadata (what llama.cpp itself uses)."""
        arch = model.meta(schema.GENERAL_ARCHITECTURE)
        scaling = model.meta(Keys.Rope.SCALING_TYPE.format(arch=arch))
        if scaling not in (None, "none", "linear"):
            raise UIOError(f"RoPE scaling '{scaling}' of this model is not supported by uio-gguf yet")
        factor = float(model.meta(Keys.Rope.SCALING_FACTOR.format(arch=arch)) or 0) if scaling == "linear" else 0.0
        n_rot = int(model.meta(Keys.Rope.DIMENSION_COUNT.format(arch=arch)) or model.head_dim)
        base = float(model.meta(Keys.Rope.FREQ_BASE.format(arch=arch)) or 10000.0)
        if kind not in (schema.ROPE_NORM, schema.ROPE_NEOX):
            raise UIOError(f"unknown RoPE type '{kind}' in the UIO head")
        return cls(kind, model.head_dim, n_rot, base, 1.0 / factor if factor else 1.0)

    def rotate(self, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """k: (..., n, n_heads * head_dim) rows at `positions` (n,) -> the rotated rows, float32.

        Each rotated pair (a, b) is the complex number a + ib times e^(i theta): one complex64 multiply
        per pair (a 56K-token book's memory is 40M values; float64 arithmetic took seconds). The angles
        are computed in float64; the product rounds like the float32 cache row it becomes."""
        return self.rotate_in_place(np.array(k, dtype=np.float32, order="C"), positions)

    def rotate_in_place(self, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """rotate() on a C-contiguous float32 array that it overwrites (no copy of a large memory)."""
        if k.dtype != np.float32 or not k.flags.c_contiguous:
            raise ValueError("rotate_in_place needs a C-contiguous float32 array")
        shape = k.shape
        x = k.reshape(*shape[:-1], shape[-1] // self.head_dim, self.head_dim)
        half = self.n_rot // 2
        inv_freq = self.base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.n_rot)
        theta = np.asarray(positions, dtype=np.float64)[:, None] * self.freq_scale * inv_freq  # (n, half)
        turn = np.exp(1j * theta).astype(np.complex64)[:, None, :]  # broadcast over heads
        if self.kind == schema.ROPE_NORM and self.n_rot == self.head_dim:
            pairs = x.view(np.complex64)  # (x[2i], x[2i+1]) as x[2i] + i x[2i+1], in place
            pairs *= turn
        else:
            if self.kind == schema.ROPE_NORM:
                a, b = x[..., 0 : self.n_rot : 2], x[..., 1 : self.n_rot : 2]
            else:
                a, b = x[..., :half], x[..., half : self.n_rot]
            rotated = (a + 1j * b).astype(np.complex64) * turn
            a[...], b[...] = rotated.real, rotated.imag
        return x.reshape(shape)
