"""Recall ranked by the model's own attention: how much the question attends to each segment's memory.

BM25 needs the question's words in the passage. The memory needs none: a segment's k slots carry what
the model kept of it, and the decoder's question already attends to them. So the question is decoded
once over [memory ; raw window] with the activation capture armed (the attention input of every layer,
uio_gguf.native), its queries are made from it with the model's own W_q, and each segment scores the
attention mass that the queries put on its slots (softmax over the memory slots, averaged over layers,
heads and the question's tokens). Queries and keys are compared before RoPE, by content alone: with
the rotation, the attention of SmolLM2-135M leans on the latest segments whatever the question is.
docs/design.md §6 compares this ranking with BM25.
"""

from __future__ import annotations

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.format import schema


class Projection:
    """The decoder's W_q (or W_k: proj="attn_k") and its bias, if the model has one, of every layer,
    dequantized from the model's GGUF with gguf-py, and the RoPE that llama.cpp applies after it:
    attention-input rows -> queries (keys), as llama.cpp computes them (before RoPE without positions)."""

    def __init__(self, model_path, n_layer: int, rope, proj: str = "attn_q"):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(str(model_path))
        tensors = {t.name: t for t in reader.tensors}
        self.weights, self.biases = [], []
        for layer in range(n_layer):
            name = schema.layer_tensor(layer, proj)
            if name not in tensors:
                raise UIOError(f"{model_path} has no tensor {name}: attention ranking needs it")
            t = tensors[name]
            self.weights.append(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
            bias = tensors.get(name.replace(".weight", ".bias"))
            self.biases.append(
                None if bias is None else np.asarray(dequantize(bias.data, bias.tensor_type), np.float32)
            )
        self.rope = rope

    def __call__(self, h: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """h: (n_layer, T, n_embd) attention inputs of T tokens -> (n_layer, T, heads·head_dim), rotated as
        llama.cpp rotates them at `positions` (T,) if given."""
        q = np.stack([x @ w.T + (0 if b is None else b) for x, w, b in zip(h, self.weights, self.biases)])
        q = np.ascontiguousarray(q, dtype=np.float32)
        return q if positions is None else self.rope.rotate_in_place(q, positions)


def segment_scores(queries: np.ndarray, keys: np.ndarray, n_head_kv: int, head_dim: int, slots: int) -> np.ndarray:
    """The attention mass the queries put on each segment's slots.

    queries: (n_layer, T, n_head·head_dim); keys: (n_layer, n_seg·slots, n_head_kv·head_dim), the memory's
    K (both before RoPE, or both rotated at their positions). Per layer, head and query token: softmax
    of q·k / sqrt(head_dim) over the memory slots, summed over each segment's slots; then the mean over
    layers, heads and tokens -> (n_seg,), summing to 1."""
    n_layer, n_tok, width = queries.shape
    n_head = width // head_dim
    group = n_head // n_head_kv  # grouped-query attention: query head j reads K head j // group
    n_cells = keys.shape[1]
    if n_cells == 0:
        return np.zeros(0)
    total = np.zeros(n_cells // slots, dtype=np.float64)
    for layer in range(n_layer):
        q = queries[layer].reshape(n_tok, n_head_kv, group, head_dim).transpose(1, 0, 2, 3)  # (kv, T, g, d)
        q = q.reshape(n_head_kv, n_tok * group, head_dim)
        k = np.asarray(keys[layer], dtype=np.float32).reshape(n_cells, n_head_kv, head_dim).transpose(1, 2, 0)
        logits = np.matmul(q, k) / np.sqrt(head_dim)  # (kv, T·g, cells)
        logits -= logits.max(-1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(-1, keepdims=True)
        total += weights.reshape(-1, n_cells // slots, slots).sum(-1).sum(0)
    return total / (n_layer * n_head * n_tok)
